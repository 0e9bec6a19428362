//! A NATS JetStream cluster on loopback for the tests and `clearhouse demo --ha`: `nats-server`
//! processes (from `PATH`, or the `NATS_SERVER` variable) on free ports, each with its own store
//! directory, killed when the cluster is dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub name: String,
    pub client_port: u16,
    pub monitor_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

/// The nats-server binary, or None when it is not installed.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    })
}

impl NatsCluster {
    /// Starts `size` servers clustered on loopback (JetStream on, 8 MiB max payload) and waits
    /// until each answers its health check.
    pub fn start(size: usize, dir: &Path) -> std::io::Result<NatsCluster> {
        // Free ports are found by binding port 0 and releasing it: another process may take one
        // in between. Try again with fresh ports (and fresh store directories) a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let attempt_dir = dir.join(format!("attempt-{attempt}"));
            match Self::start_once(size, &attempt_dir) {
                Ok(cluster) => return Ok(cluster),
                Err(error) if attempt < 3 => {
                    eprintln!("nats cluster did not start ({error}); trying other ports");
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn start_once(size: usize, dir: &Path) -> std::io::Result<NatsCluster> {
        let binary = nats_server_binary().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "nats-server is not installed (Debian package nats-server, or set NATS_SERVER)",
            )
        })?;
        // Hold every listener until all ports are chosen, so no port is handed out twice.
        let listeners: Vec<TcpListener> = (0..size * 3)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let mut free = listeners
            .iter()
            .map(|listener| listener.local_addr().map(|address| address.port()))
            .collect::<std::io::Result<Vec<u16>>>()?
            .into_iter();
        let ports: Vec<(u16, u16, u16)> = (0..size)
            .map(|_| {
                (
                    free.next().expect("port"),
                    free.next().expect("port"),
                    free.next().expect("port"),
                )
            })
            .collect();
        drop(listeners);
        let mut servers = Vec::new();
        for (index, (client, monitor, route)) in ports.iter().enumerate() {
            let name = format!("n{}", index + 1);
            let store = dir.join(&name);
            std::fs::create_dir_all(&store)?;
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(_, (_, _, r))| format!("nats-route://127.0.0.1:{r}"))
                .collect();
            let cluster = if size > 1 {
                format!(
                    "cluster {{ name: clearhouse, listen: 127.0.0.1:{route}, routes: [{}] }}",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = dir.join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\nmax_payload: 8388608\njetstream {{ store_dir: \"{}\", max_file_store: 8589934592, max_memory_store: 268435456 }}\n{cluster}\n",
                    store.display()
                ),
            )?;
            servers.push(NatsServer {
                name,
                client_port: *client,
                monitor_port: *monitor,
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { servers };
        for index in 0..size {
            cluster.servers[index].spawn(&binary)?;
        }
        for server in &cluster.servers {
            server.wait_healthy(Duration::from_secs(20))?;
        }
        Ok(cluster)
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|server| format!("nats://127.0.0.1:{}", server.client_port))
            .collect()
    }

    /// The running servers' process ids (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .filter_map(|server| server.child.as_ref().map(|child| child.id()))
            .collect()
    }

    /// kill -9 one server.
    pub fn kill(&mut self, index: usize) {
        self.servers[index].kill();
    }

    /// Restarts a killed server with the same store directory.
    pub fn restart(&mut self, index: usize) -> std::io::Result<()> {
        let binary = nats_server_binary().expect("nats-server");
        self.servers[index].spawn(&binary)?;
        self.servers[index].wait_healthy(Duration::from_secs(20))
    }
}

impl NatsServer {
    fn spawn(&mut self, binary: &Path) -> std::io::Result<()> {
        let log = self.config.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        self.child = Some(
            Command::new(binary)
                .arg("-c")
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_healthy(&self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.monitor_port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nats server {} not healthy", self.name),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
    }
}

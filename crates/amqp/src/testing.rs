//! A private RabbitMQ node for tests and benchmarks (Debian's `rabbitmq-server`): its own
//! directory, node name, and AMQP, distribution and epmd ports on loopback, no plugins, the
//! vhost `switch` with the switch's user loaded at boot. Killed with its whole process group on
//! drop. Not for production: a scheme's broker is run and provisioned by its operator.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::AmqpError;

/// Where Debian puts the server's own scripts (the `/usr/sbin` wrappers switch to the
/// `rabbitmq` user, which cannot use a private directory).
pub const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
/// The vhost, switch user and password of the node.
pub const VHOST: &str = "switch";
pub const SWITCH_USER: &str = "switch";
pub const SWITCH_PASSWORD: &str = "switch-password";

fn free_port() -> Result<u16, AmqpError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| AmqpError::Config(format!("no free port: {e}")))
}

pub struct Rabbit {
    dir: PathBuf,
    pub port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Rabbit {
    /// Starts a node in `parent/rabbit` and waits (up to 90 s) for its AMQP listener.
    pub fn start(parent: &Path) -> Result<Rabbit, AmqpError> {
        let dir = parent.join("rabbit");
        let io = |e: std::io::Error| AmqpError::Config(format!("{}: {e}", dir.display()));
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io)?;
        }
        let port = free_port()?;
        let definitions = crate::definitions::definitions(
            VHOST,
            std::iter::empty(),
            Some((SWITCH_USER, SWITCH_PASSWORD)),
        );
        std::fs::write(dir.join("defs.json"), definitions.to_string()).map_err(io)?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "loopback_users = none\nlog.console = false\nlog.file.level = warning\nload_definitions = {}\n",
                dir.join("defs.json").display()
            ),
        )
        .map_err(io)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").map_err(io)?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "").map_err(io)?;
        let path = |name: &str| dir.join(name).display().to_string();
        let env = vec![
            ("HOME".into(), path("home")),
            ("RABBITMQ_CONF_ENV_FILE".into(), path("rabbitmq-env.conf")),
            ("RABBITMQ_NODENAME".into(), format!("ch{port}@localhost")),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), free_port()?.to_string()),
            ("ERL_EPMD_PORT".into(), free_port()?.to_string()),
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), path("log")),
            ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq.conf")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                path("enabled_plugins"),
            ),
            ("RABBITMQ_PID_FILE".into(), path("rabbit.pid")),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(),
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ];
        let mut rabbit = Rabbit {
            dir,
            port,
            env,
            child: None,
        };
        rabbit.run()?;
        Ok(rabbit)
    }

    /// Starts the node (again, on the same directory) and waits for its AMQP listener.
    pub fn run(&mut self) -> Result<(), AmqpError> {
        let child = Command::new(format!("{RABBIT_BIN}/rabbitmq-server"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                AmqpError::Config(format!(
                    "starting {RABBIT_BIN}/rabbitmq-server (Debian package rabbitmq-server): {e}"
                ))
            })?;
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if started.elapsed() > Duration::from_secs(90) {
                return Err(AmqpError::Broker(format!(
                    "rabbitmq-server not listening after 90 s (log in {})",
                    self.dir.join("log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// SIGKILL to the node's whole process group (the broker crashes).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .output();
            let _ = child.wait();
        }
    }

    /// `amqp://127.0.0.1:PORT/switch` (no credentials).
    pub fn url(&self) -> String {
        format!("amqp://127.0.0.1:{}/{VHOST}", self.port)
    }

    /// The switch's URL, with its user.
    pub fn switch_url(&self) -> String {
        format!(
            "amqp://{SWITCH_USER}:{SWITCH_PASSWORD}@127.0.0.1:{}/{VHOST}",
            self.port
        )
    }

    /// The broker's own process (beam.smp), for CPU accounting.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("rabbit.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// Runs `rabbitmqctl ARGS` against the node; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, AmqpError> {
        let output = Command::new(format!("{RABBIT_BIN}/rabbitmqctl"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .output()
            .map_err(|e| AmqpError::Config(format!("rabbitmqctl: {e}")))?;
        if !output.status.success() {
            return Err(AmqpError::Broker(format!(
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Imports definitions (participants' users and permissions) into the node.
    pub fn import(&self, definitions: &serde_json::Value) -> Result<(), AmqpError> {
        let file = self
            .dir
            .join(format!("import-{}.json", crate::auth_nonce()));
        std::fs::write(&file, definitions.to_string())
            .map_err(|e| AmqpError::Config(format!("{}: {e}", file.display())))?;
        self.ctl(&["import_definitions", &file.display().to_string()])?;
        Ok(())
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.kill();
        if let Some((_, epmd)) = self.env.iter().find(|(k, _)| k == "ERL_EPMD_PORT") {
            let _ = Command::new("epmd")
                .args(["-port", epmd, "-kill"])
                .env("ERL_EPMD_PORT", epmd)
                .output();
        }
    }
}

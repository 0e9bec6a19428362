//! The API over TLS (rustls): a real handshake against a certificate the test makes, a signed
//! request inside it, and plain HTTP refused on the TLS port.

use std::sync::Arc;

use bytes::Bytes;
use clearhouse_engine::{Node, NodeOptions};
use clearhouse_switch::{auth, Switch, SwitchConfig};
use http_body_util::{BodyExt, Full};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio_rustls::rustls;

#[test]
fn the_api_is_served_over_tls_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut options = NodeOptions::new(dir.path().join("ledger"));
        options.disk_free_min_bytes = 16 * 1024 * 1024;
        options.unindexed_transfers_max = 10_000;
        let node = Node::start(options).unwrap();
        let config = SwitchConfig {
            tls_cert_pem: Some(cert_path.clone()),
            tls_key_pem: Some(key_path.clone()),
            // Same machine, same clock: accept signatures at once.
            clock_lead_ms: 0,
            ..SwitchConfig::default()
        };
        let switch = Switch::start(node, config, dir.path()).await.unwrap();
        let acceptor = clearhouse_switch::http::tls_acceptor(&cert_path, &key_path).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(clearhouse_switch::http::serve_tls(
            listener,
            switch,
            acceptor,
            std::future::pending(),
        ));

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&cert_path).unwrap())
            .unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);

        let text = std::fs::read_to_string(dir.path().join("operator.key")).unwrap();
        let mut parts = text.split_whitespace();
        let (key_id, secret) = (
            parts.next().unwrap(),
            hex::decode(parts.next().unwrap()).unwrap(),
        );
        let mut request = hyper::Request::get("/v1/stats").header("host", "localhost");
        for (name, value) in auth::sign_request(key_id, &secret, "GET", "/v1/stats", b"") {
            request = request.header(name, value);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(stats["settled"], 0);

        // Plain HTTP on the TLS port gets no HTTP answer.
        let plain = clearhouse_switch::client::SignedClient::new(
            &format!("http://{address}"),
            key_id,
            secret,
        );
        assert!(plain.request("GET", "/v1/stats", b"").await.is_err());
    });
}

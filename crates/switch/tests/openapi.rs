//! The OpenAPI document describes exactly the routes the server has: every documented path and
//! method is routed (the router's fallback answers `no_route` otherwise), and every route in the
//! router's source is documented.

use std::collections::BTreeSet;

use clearhouse_engine::{Node, NodeOptions};
use clearhouse_switch::client::SignedClient;
use clearhouse_switch::{Switch, SwitchConfig};

#[test]
fn the_openapi_document_matches_the_router() {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../src/openapi.json")).unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    // Routes as the router's source declares them: .route("/path", get(..).post(..)).
    let source = include_str!("../src/http.rs");
    let mut routed = BTreeSet::new();
    for line in source
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(".route(\""))
    {
        let path = line.split('"').nth(1).unwrap().to_string();
        for method in ["get", "post", "patch", "put", "delete"] {
            if line.contains(&format!("{method}(")) {
                routed.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    assert_eq!(documented, routed, "openapi.json and the router disagree");

    // And the running server answers each documented route with something else than no_route.
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut options = NodeOptions::new(dir.path().join("ledger"));
        options.disk_free_min_bytes = 16 * 1024 * 1024;
        options.unindexed_transfers_max = 10_000;
        let node = Node::start(options).unwrap();
        let switch = Switch::start(node, SwitchConfig::default(), dir.path())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(clearhouse_switch::http::serve(
            listener,
            switch,
            std::future::pending(),
        ));
        let client = SignedClient::new(&url, "nobody", vec![1]);
        for (method, path) in &documented {
            let concrete = path
                .replace("{id}", "0123456789abcdef0123456789abcdef")
                .replace("{bic}", "BANKDEFF");
            let (status, body) = client.send(method, &concrete, b"", &[]).await.unwrap();
            let body = String::from_utf8_lossy(&body);
            assert!(
                !(status == 404 && body.contains("no_route")) && status != 405,
                "{method} {path}: {status} {body}"
            );
        }
        let (status, body) = client
            .send("GET", "/v1/nothing-here", b"", &[])
            .await
            .unwrap();
        assert!(status == 404 && String::from_utf8_lossy(&body).contains("no_route"));
    });
}

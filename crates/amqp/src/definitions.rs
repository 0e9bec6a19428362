//! RabbitMQ definitions (the JSON `rabbitmqctl import_definitions` and `load_definitions`
//! read) for the scheme's broker: a user per AMQP participant with permissions on its own
//! resources only, and optionally the switch's user.
//!
//! A participant may write only its exchange `ch.in.<BIC>` (never `amq.default`, the default
//! exchange, which routes to any queue by name) and read only its three outgoing queues; it
//! configures nothing. So the broker itself refuses a participant publishing into another's
//! queue (403 ACCESS_REFUSED), before the switch sees anything.

use base64::Engine;
use clearhouse_switch::model::Participant;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::participant_password;

/// RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt ‖ SHA-256(salt ‖ password)), with a
/// random 4-byte salt.
pub fn password_hash(password: &str) -> String {
    let mut salt = [0u8; 4];
    getrandom::fill(&mut salt).expect("operating system randomness");
    let mut hashed = salt.to_vec();
    hashed.extend_from_slice(
        &Sha256::new()
            .chain_update(salt)
            .chain_update(password)
            .finalize(),
    );
    base64::engine::general_purpose::STANDARD.encode(hashed)
}

fn escape(bic: &str) -> String {
    // BICs are letters and digits (checked at onboarding): nothing to escape but the dots of
    // the names around them.
    bic.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
}

/// The definitions for `vhost`: the AMQP participants' users and permissions and, when
/// `switch_user` is given (`(name, password)`), the switch's user with full rights on the vhost.
pub fn definitions<'a>(
    vhost: &str,
    participants: impl IntoIterator<Item = &'a Participant>,
    switch_user: Option<(&str, &str)>,
) -> Value {
    let mut users = Vec::new();
    let mut permissions = Vec::new();
    if let Some((name, password)) = switch_user {
        users.push(json!({
            "name": name, "password_hash": password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"],
        }));
        permissions.push(json!({
            "user": name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*",
        }));
    }
    for participant in participants.into_iter().filter(|p| p.over_amqp()) {
        let Ok(secret) = hex::decode(&participant.secret_hex) else {
            continue;
        };
        let bic = escape(&participant.bic);
        users.push(json!({
            "name": participant.bic, "password_hash": password_hash(&participant_password(&secret)),
            "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": [],
        }));
        permissions.push(json!({
            "user": participant.bic, "vhost": vhost,
            "configure": "^$",
            "write": format!("^ch\\.in\\.{bic}$"),
            "read": format!("^ch\\.(fwd|ntf|ans)\\.{bic}$"),
        }));
    }
    json!({
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": permissions,
    })
}

/// `GET /v1/admin/amqp/definitions` (operator only, signed as every request): the definitions
/// of the AMQP participants' users and permissions on `vhost`, to import into the broker
/// (`rabbitmqctl import_definitions FILE`) after onboarding. Password hashes only: the
/// participants' secrets never leave the switch.
pub fn routes(
    switch: std::sync::Arc<clearhouse_switch::switch::Switch>,
    vhost: String,
) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::response::IntoResponse;
    use clearhouse_switch::auth::SignedHeaders;
    axum::Router::new().route(
        "/v1/admin/amqp/definitions",
        axum::routing::get(move |uri: Uri, headers: HeaderMap| async move {
            let signed = SignedHeaders::of_http(&headers);
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            match switch.authenticate(&signed, "GET", path, b"") {
                Ok(clearhouse_switch::api::Caller::Operator) => {
                    let participants = switch.participants();
                    axum::Json(definitions(&vhost, participants.values(), None)).into_response()
                }
                Ok(_) => (
                    StatusCode::FORBIDDEN,
                    axum::Json(json!({"code": "forbidden", "message": "operator only"})),
                )
                    .into_response(),
                Err(error) => (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"code": "unauthorized", "message": error.to_string()})),
                )
                    .into_response(),
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_hash_is_rabbitmqs_salted_sha256() {
        let hash = password_hash("secret");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(hash)
            .unwrap();
        assert_eq!(bytes.len(), 36);
        let (salt, digest) = bytes.split_at(4);
        let expected = Sha256::new()
            .chain_update(salt)
            .chain_update("secret")
            .finalize();
        assert_eq!(digest, expected.as_slice());
    }
}

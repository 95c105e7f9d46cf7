//! Unary gRPC calls to a cluster, for the filters that ask a service (external
//! authorization, rate limit service): one length-prefixed protobuf message out, one back,
//! over the callout client (the cluster's endpoints, transport and HTTP/2).

use crate::plugins::callout::CalloutClient;
use bytes::{Buf, BufMut};
use nip_filters::host::Callout;
use prost::Message;
use std::time::Duration;

/// One unary call of `method` (`/package.Service/Method`) on `cluster`.
pub async fn unary<Response: Message + Default>(
    client: &CalloutClient,
    cluster: &str,
    authority: &str,
    method: &str,
    request: &impl Message,
    timeout: Duration,
) -> Result<Response, String> {
    let message = request.encode_to_vec();
    let mut body = Vec::with_capacity(message.len() + 5);
    body.put_u8(0);
    body.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    body.extend_from_slice(&message);
    let callout = Callout {
        token: 0,
        context: 0,
        upstream: cluster.to_string(),
        headers: vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), method.to_string()),
            (":authority".to_string(), authority.to_string()),
            ("content-type".to_string(), "application/grpc".to_string()),
            ("te".to_string(), "trailers".to_string()),
            (
                "grpc-timeout".to_string(),
                format!("{}m", timeout.as_millis().max(1)),
            ),
        ],
        body,
        trailers: Vec::new(),
        timeout,
    };
    let answer = client.call(&callout).await;
    let header = |name: &str| {
        answer
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match header(":status") {
        None => return Err(format!("cluster {cluster:?} did not answer")),
        Some("200") => {}
        Some(other) => return Err(format!("HTTP {other}")),
    }
    // A trailers-only answer carries grpc-status in its headers.
    if let Some(code) = header("grpc-status").filter(|c| *c != "0") {
        return Err(format!(
            "grpc-status {code} {}",
            header("grpc-message").unwrap_or("")
        ));
    }
    let mut frame = answer.body.as_slice();
    if frame.len() < 5 || frame[0] != 0 {
        return Err("the answer is not one uncompressed gRPC message".into());
    }
    frame.advance(1);
    let length = frame.get_u32() as usize;
    frame
        .get(..length)
        .and_then(|m| Response::decode(m).ok())
        .ok_or_else(|| "the answer does not decode".to_string())
}

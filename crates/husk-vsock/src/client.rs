//! The agent's ttrpc client over a handshaken hybrid-vsock stream.

use std::path::Path;
use std::time::Duration;

use husk_protocol::AgentServiceClient;
use ttrpc::asynchronous::transport::Socket;
use ttrpc::asynchronous::Client;

use crate::connect::{connect_async, Error};

/// Connects to the agent (guest port [`husk_protocol::AGENT_VSOCK_PORT`])
/// through the VMM's hybrid-vsock socket `uds`, retrying until `timeout`.
///
/// Must be called inside a tokio runtime: the ttrpc client spawns its
/// connection task there.
pub async fn agent_client(uds: &Path, timeout: Duration) -> Result<AgentServiceClient, Error> {
    let stream = connect_async(uds, husk_protocol::AGENT_VSOCK_PORT, timeout).await?;
    Ok(AgentServiceClient::new(Client::new(Socket::new(stream))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::{CheckRequest, CheckResponse};
    use husk_protocol::{create_agent_service, AgentService};
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use ttrpc::asynchronous::{Server, TtrpcContext};

    struct FakeAgent;

    #[async_trait::async_trait]
    impl AgentService for FakeAgent {
        async fn check(
            &self,
            _ctx: &TtrpcContext,
            _req: CheckRequest,
        ) -> ttrpc::Result<CheckResponse> {
            let mut resp = CheckResponse::new();
            resp.kernel_release = "fake-kernel".into();
            resp.agent_version = "fake-agent".into();
            Ok(resp)
        }
    }

    /// A ttrpc agent behind a fake VMM: the first connection is closed
    /// (guest not up yet), later ones are handshaken and spliced to the agent.
    #[tokio::test(flavor = "current_thread")]
    async fn agent_client_calls_check_through_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let mut server = Server::new()
            .bind(&format!("unix://{}", agent_sock.display()))
            .unwrap()
            .register_service(create_agent_service(Arc::new(FakeAgent)));
        server.start().await.unwrap();

        let uds = dir.path().join("vsock.sock");
        let vmm = tokio::net::UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let Ok((conn, _)) = vmm.accept().await else {
                    return;
                };
                let mut conn = BufReader::new(conn);
                let mut line = String::new();
                if conn.read_line(&mut line).await.is_err() {
                    continue;
                }
                assert_eq!(line, "CONNECT 1024\n");
                if std::mem::take(&mut first) {
                    continue; // drop: not listening yet
                }
                let mut conn = conn.into_inner();
                conn.write_all(b"OK 99\n").await.unwrap();
                let agent_sock = agent_sock.clone();
                tokio::spawn(async move {
                    let mut guest = tokio::net::UnixStream::connect(agent_sock).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
                });
            }
        });

        let client = agent_client(&uds, Duration::from_secs(5)).await.unwrap();
        let resp = client
            .check(
                ttrpc::context::with_timeout(5_000_000_000),
                &CheckRequest::new(),
            )
            .await
            .unwrap();
        assert_eq!(resp.kernel_release, "fake-kernel");
        assert_eq!(resp.agent_version, "fake-agent");
        server.shutdown().await.unwrap();
    }
}

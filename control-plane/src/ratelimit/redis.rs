//! Just enough of the Redis protocol (RESP2) for the rate limit service: commands out,
//! replies in, over a small pool of connections that are dropped on any error and made
//! again on the next call.

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Status(String),
    /// `:1`.
    Integer(i64),
    /// `$…` (`None`: nil).
    Bulk(Option<Vec<u8>>),
    /// `*…`.
    Array(Vec<Reply>),
}

/// Why a command did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Connecting, writing or reading failed (or took too long).
    #[error("redis at {address}: {reason}")]
    Io {
        /// The server.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with an error (`-ERR …`).
    #[error("redis answered: {0}")]
    Server(String),
}

type Connection = BufReader<TcpStream>;

/// Connections to one Redis server.
#[derive(Debug)]
pub struct Redis {
    address: String,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

/// Most idle connections kept.
const POOL: usize = 16;

impl Redis {
    /// A client of the server at `address` (`host:port`); every command must finish
    /// within `timeout`.
    pub fn new(address: &str, timeout: Duration) -> Redis {
        Redis {
            address: address.to_string(),
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn io(&self, reason: impl std::fmt::Display) -> RedisError {
        RedisError::Io {
            address: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    /// Runs one command.
    pub async fn command(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let pooled = self.idle.lock().await.pop();
        let mut connection = match pooled {
            Some(c) => c,
            None => {
                let stream = tokio::time::timeout(self.timeout, TcpStream::connect(&self.address))
                    .await
                    .map_err(|_| self.io("connect timed out"))?
                    .map_err(|e| self.io(e))?;
                let _ = stream.set_nodelay(true);
                BufReader::new(stream)
            }
        };
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        let exchange = async {
            connection.get_mut().write_all(&request).await?;
            read_reply(&mut connection).await
        };
        let reply = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.io("no reply in time"))?
            .map_err(|e| self.io(e))?;
        let mut idle = self.idle.lock().await;
        if idle.len() < POOL {
            idle.push(connection);
        }
        drop(idle);
        reply.map_err(RedisError::Server)
    }
}

/// Reads one reply: `Ok(Err(message))` for a server error.
async fn read_reply(connection: &mut Connection) -> std::io::Result<Result<Reply, String>> {
    let mut line = String::new();
    if connection.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches("\r\n");
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a RESP reply");
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    Ok(Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => return Ok(Err(rest.to_string())),
        ":" => Reply::Integer(rest.parse().map_err(|_| bad())?),
        "$" => {
            let length: i64 = rest.parse().map_err(|_| bad())?;
            if length < 0 {
                Reply::Bulk(None)
            } else {
                let mut data = vec![0; usize::try_from(length).map_err(|_| bad())? + 2];
                connection.read_exact(&mut data).await?;
                data.truncate(data.len() - 2);
                Reply::Bulk(Some(data))
            }
        }
        "*" => {
            let count: i64 = rest.parse().map_err(|_| bad())?;
            // Every item is read, an error among them too, so the connection stays in
            // step for its next command.
            let mut items = Vec::new();
            let mut error = None;
            for _ in 0..count.max(0) {
                match Box::pin(read_reply(connection)).await? {
                    Ok(item) => items.push(item),
                    Err(message) => {
                        error.get_or_insert(message);
                    }
                }
            }
            if let Some(message) = error {
                return Ok(Err(message));
            }
            Reply::Array(items)
        }
        _ => return Err(bad()),
    }))
}

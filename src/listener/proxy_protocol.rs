//! The PROXY protocol (v1/v2, parsed by the `ppp` crate): a load balancer in front of hubgate
//! names the client's address in a header before the TLS handshake. When enabled, every
//! connection must start with one, and only from a trusted proxy.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::{HeaderResult, PartialResult};
use tokio::net::TcpStream;

/// Why a PROXY protocol header was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection from an untrusted address {0} on a PROXY protocol listener")]
    Untrusted(IpAddr),
    #[error("no complete PROXY header within the deadline")]
    Timeout,
    #[error("invalid PROXY header")]
    Invalid,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Longest PROXY header accepted: v1 is at most 107 bytes; v2 with modest TLVs fits easily.
pub const MAX_PROXY_HEADER: usize = 1024;

/// What the bytes at the start of a connection are, as a PROXY header.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header: read more (up to [`MAX_PROXY_HEADER`]).
    Incomplete,
    /// Not a PROXY header.
    Invalid,
    /// A header of `len` bytes naming this client (`None` for LOCAL/UNKNOWN).
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
}

/// Parses the start of `buf` as a PROXY v1 or v2 header. Pure: the fuzz target's entry point.
pub fn parse(buf: &[u8]) -> Parsed {
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return Parsed::Incomplete;
    }
    let (len, client) = match parsed {
        HeaderResult::V1(Ok(h)) => {
            let addr = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            (h.header.len(), addr)
        }
        HeaderResult::V2(Ok(h)) => {
            let addr = match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            (h.len(), addr)
        }
        _ => return Parsed::Invalid,
    };
    if len == 0 || len > buf.len() {
        return Parsed::Invalid;
    }
    Parsed::Header { len, client }
}

/// Reads a PROXY protocol v1 or v2 header from the start of `stream`, consuming exactly its
/// bytes, and returns the client address it names (`None` for LOCAL/UNKNOWN: use the peer's).
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: bool,
    deadline: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if !trusted {
        return Err(ProxyHeaderError::Untrusted(peer.ip()));
    }
    let read = async {
        let mut buf = vec![0u8; MAX_PROXY_HEADER];
        loop {
            // Peek so that no byte of the TLS handshake that follows is consumed.
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(ProxyHeaderError::Invalid);
            }
            match parse(&buf[..n]) {
                Parsed::Incomplete => {
                    if n == MAX_PROXY_HEADER {
                        return Err(ProxyHeaderError::Invalid);
                    }
                    stream.readable().await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Parsed::Invalid => return Err(ProxyHeaderError::Invalid),
                Parsed::Header { len, client } => {
                    let mut consumed = vec![0u8; len];
                    tokio::io::AsyncReadExt::read_exact(stream, &mut consumed).await?;
                    return Ok(client);
                }
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

//! The command line's side of the admin endpoint (`edgegate reload`, `status`, `top`): one
//! HTTP/1.1 request per connection to the address the configuration names, with the
//! `[admin.auth]` credentials from the same environment variable the gateway reads and over
//! TLS when `[admin.tls]` is configured. Blocking, with a timeout: these commands do nothing else
//! meanwhile.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::config::{AdminConfig, Config};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration has no `[admin]` table: add one (and restart), or use signals.
    #[error("the configuration has no [admin] table, so the running gateway cannot be asked; add [admin] listen = \"127.0.0.1:9898\" and restart it")]
    NoAdmin,
    /// `[admin.auth]` or `[admin.tls]` cannot be used here (a variable not set in this shell, a
    /// file not readable): fix the environment and try again.
    #[error("{key}: {message}")]
    Setup { key: String, message: String },
    /// Nothing answers there: the gateway is not running, or listens elsewhere.
    #[error("cannot reach the admin endpoint at {addr}: {source} (is edgegate running with this configuration?)")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// It connected but gave no answer in time: the gateway is busy or stuck (its log says
    /// which); for a reload, it may still be applied.
    #[error("the admin endpoint at {addr} gave no answer within {}s; see the gateway's log", .after.as_secs())]
    NoAnswer { addr: SocketAddr, after: Duration },
    /// The TLS handshake failed: the endpoint's certificate is not the one trusted, or it does
    /// not speak TLS (`[admin.tls]` added without a restart or reload).
    #[error("TLS with the admin endpoint at {addr} failed: {message}")]
    Handshake { addr: SocketAddr, message: String },
    /// The endpoint refused the credentials: this shell's variable holds another secret than
    /// the gateway's.
    #[error("the admin endpoint at {addr} refused the credentials of [admin.auth] (401): is the secret in this shell the gateway's?")]
    Unauthorized { addr: SocketAddr },
    /// Something answered, but not HTTP as edgegate speaks it.
    #[error("the admin endpoint at {addr} gave no valid answer: {message}")]
    BadAnswer { addr: SocketAddr, message: String },
}

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

pub struct AdminClient {
    addr: SocketAddr,
    timeout: Duration,
    /// The `Authorization` header's value.
    authorization: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl AdminClient {
    /// The endpoint of the gateway running with `config`; a wildcard listen address is reached
    /// on loopback.
    pub fn for_config(config: &Config, timeout: Duration) -> Result<AdminClient, ClientError> {
        let admin = config.admin.as_ref().ok_or(ClientError::NoAdmin)?;
        AdminClient::for_admin(admin, timeout)
    }

    /// The endpoint an `[admin]` table describes.
    pub fn for_admin(admin: &AdminConfig, timeout: Duration) -> Result<AdminClient, ClientError> {
        let mut addr = admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let authorization = match &admin.auth {
            Some(auth) => {
                let credentials = auth
                    .credentials()
                    .map_err(|(key, message)| ClientError::Setup { key, message })?;
                Some(super::auth::header(&credentials))
            }
            None => None,
        };
        let tls = match &admin.tls {
            Some(tls) => {
                Some(
                    super::tls::client_config(tls).map_err(|message| ClientError::Setup {
                        key: "admin.tls".into(),
                        message,
                    })?,
                )
            }
            None => None,
        };
        Ok(AdminClient {
            addr,
            timeout,
            authorization,
            tls,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https` or `http`, for messages and the status page's address.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path)
    }

    pub fn post(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("POST", path)
    }

    /// A POST with one more header (`name: value`, both plain ASCII).
    pub fn post_with(&self, path: &str, name: &str, value: &str) -> Result<Answer, ClientError> {
        self.request_with("POST", path, &format!("{name}: {value}\r\n"))
    }

    fn request(&self, method: &str, path: &str) -> Result<Answer, ClientError> {
        self.request_with(method, path, "")
    }

    fn request_with(&self, method: &str, path: &str, extra: &str) -> Result<Answer, ClientError> {
        let addr = self.addr;
        let after = self.timeout;
        // A read that runs out of time is a gateway that is busy or stuck, not one that is gone.
        let unreachable = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::NoAnswer { addr, after }
            }
            _ => ClientError::Unreachable { addr, source },
        };
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(unreachable)?;
        let authorization = self
            .authorization
            .as_ref()
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let raw = match &self.tls {
            None => exchange(&mut stream, &request).map_err(unreachable)?,
            Some(tls) => {
                let mut tls = self.handshake(tls, &mut stream)?;
                let mut tls = rustls::Stream::new(&mut tls, &mut stream);
                exchange(&mut tls, &request).map_err(unreachable)?
            }
        };
        let answer =
            parse_answer(&raw).map_err(|message| ClientError::BadAnswer { addr, message })?;
        if answer.status == 401 {
            return Err(ClientError::Unauthorized { addr });
        }
        Ok(answer)
    }

    fn handshake(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        stream: &mut TcpStream,
    ) -> Result<rustls::ClientConnection, ClientError> {
        let addr = self.addr;
        let failed = |message: String| ClientError::Handshake { addr, message };
        let name = ServerName::IpAddress(addr.ip().into());
        let mut conn =
            rustls::ClientConnection::new(tls.clone(), name).map_err(|e| failed(e.to_string()))?;
        while conn.is_handshaking() {
            conn.complete_io(stream)
                .map_err(|e| failed(e.to_string()))?;
        }
        Ok(conn)
    }
}

/// The largest answer read; edgegate's are a few kilobytes (the metrics text the largest).
const MAX_ANSWER_BYTES: u64 = 16 * 1024 * 1024;

/// Sends `request` and reads the answer until the server closes. A TLS peer that closes
/// without a close_notify after answering is taken as done: the answer says how long it is.
fn exchange(stream: &mut impl ReadWrite, request: &str) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    // Whatever answers on the port (maybe not edgegate) cannot make the command hold more.
    match stream.take(MAX_ANSWER_BYTES).read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e),
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Status and body of a `Connection: close` answer (plain or chunked).
fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no end of headers".to_owned())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {:?}", head.lines().next().unwrap_or("")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Answer { status, body })
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| "truncated chunk".to_owned())?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| "truncated chunk".to_owned())?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_answers_are_read() {
        let plain = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((plain.status, plain.body.as_str()), (200, "ok\n"));
        let chunked = b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let chunked = parse_answer(chunked).unwrap();
        assert_eq!((chunked.status, chunked.body.as_str()), (409, "abcde"));
        assert!(parse_answer(b"garbage").is_err());
    }
}

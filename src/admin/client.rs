//! The command line's side of the admin endpoint (`edgegate reload`, `status`, `top`): one
//! HTTP/1.1 request per connection to the address the configuration names. Blocking, with a
//! timeout: these commands do nothing else meanwhile.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration has no `[admin]` table: add one (and restart), or use signals.
    #[error("the configuration has no [admin] table, so the running gateway cannot be asked; add [admin] listen = \"127.0.0.1:9898\" and restart it")]
    NoAdmin,
    /// Nothing answers there: the gateway is not running, or listens elsewhere.
    #[error("cannot reach the admin endpoint at {addr}: {source} (is edgegate running with this configuration?)")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
}

impl AdminClient {
    /// The endpoint of the gateway running with `config`; a wildcard listen address is reached
    /// on loopback.
    pub fn for_config(config: &Config, timeout: Duration) -> Result<AdminClient, ClientError> {
        let admin = config.admin.as_ref().ok_or(ClientError::NoAdmin)?;
        let mut addr = admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Ok(AdminClient { addr, timeout })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path)
    }

    pub fn post(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("POST", path)
    }

    fn request(&self, method: &str, path: &str) -> Result<Answer, ClientError> {
        let addr = self.addr;
        let unreachable = |source| ClientError::Unreachable { addr, source };
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(unreachable)?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).map_err(unreachable)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(unreachable)?;
        parse_answer(&raw).map_err(|message| ClientError::BadAnswer { addr, message })
    }
}

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

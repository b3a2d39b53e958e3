//! HTTPS for the admin endpoint (`[admin.tls]`): the server's rustls configuration, a listener
//! that does handshakes off the accept loop, and the command line's client configuration.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

use crate::config::{AdminTlsConfig, Config};

/// A client that has not finished its handshake by then is dropped (a real one needs
/// milliseconds, also over a slow mobile link).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes under way at once; further connections are closed until one ends.
const MAX_HANDSHAKES: usize = 32;
/// Connections open at once, plain or TLS: each costs a socket and buffers, and the gateway's
/// sources need file descriptors too. Further connections are closed until one ends.
const MAX_CONNECTIONS: usize = 64;
/// A connection that neither sends nor receives for this long is closed: a client that stops
/// halfway through its headers must not hold a connection (or the gateway's shutdown) for good.
/// The page polls every 2 s, well within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The server's TLS settings; `Err` is (key, message) for `check`.
pub fn server_config(tls: &AdminTlsConfig) -> Result<Arc<ServerConfig>, (String, String)> {
    let certs = read_certificates(&tls.cert).map_err(|m| ("admin.tls.cert".to_owned(), m))?;
    let key_err = |m: String| ("admin.tls.key".to_owned(), m);
    let pem = std::fs::read(&tls.key)
        .map_err(|e| key_err(format!("cannot read {}: {e}", tls.key.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| key_err(format!("{}: not a PEM private key: {e}", tls.key.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| key_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| key_err(format!("does not fit admin.tls.cert: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The command line's TLS settings: trust `ca_file` (the server must be certified for the
/// address it is reached at) or, without one, exactly the configured certificate.
pub fn client_config(tls: &AdminTlsConfig) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match &tls.ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let leaf = read_certificates(&tls.cert)?.into_iter().next();
            let pinned = leaf.ok_or_else(|| format!("{}: no certificate", tls.cert.display()))?;
            let verifier = Pinned {
                cert: pinned,
                algorithms: provider().signature_verification_algorithms,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate, whatever names it carries: the command line runs where the
/// gateway runs and reads the certificate from the same file, so a byte-equal certificate is
/// the gateway's (its signature over the handshake is still verified).
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the endpoint's certificate is not admin.tls.cert (set admin.tls.ca_file to trust a CA instead)".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One accepted connection: TLS when `[admin.tls]` is configured, plain otherwise; it holds one
/// of the [`MAX_CONNECTIONS`] slots until it closes, and is closed after [`IDLE_TIMEOUT`]
/// without traffic.
pub struct Connection {
    io: Either<TlsStream<TcpStream>, TcpStream>,
    _slot: OwnedSemaphorePermit,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Connection {
    fn new(io: Either<TlsStream<TcpStream>, TcpStream>, slot: OwnedSemaphorePermit) -> Connection {
        Connection {
            io,
            _slot: slot,
            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
        }
    }

    /// Traffic moved: the idle clock starts again.
    fn active(&mut self) {
        let deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
        self.idle.as_mut().reset(deadline);
    }

    /// While the connection waits, whether it has waited too long.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "admin connection idle")
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(done) => {
                self.active();
                Poll::Ready(done)
            }
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(done) => {
                self.active();
                Poll::Ready(done)
            }
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The admin endpoint's listener. Handshakes run in tasks of their own, so one slow client does
/// not hold up the others; `[admin.tls]` is read again after each reload (a renewed certificate
/// needs no restart).
pub struct AdminListener {
    incoming: mpsc::Receiver<(Connection, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl AdminListener {
    pub fn new(listener: TcpListener, config: watch::Receiver<Arc<Config>>) -> AdminListener {
        let (tx, incoming) = mpsc::channel(8);
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let accepting = tokio::spawn(accept_loop(listener, config, tx));
        AdminListener {
            incoming,
            local,
            accepting,
        }
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        match self.incoming.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended: nothing more will come; serving ends with shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// What connections get under the configuration in force.
enum Mode {
    Plain,
    Tls(TlsAcceptor),
    /// `[admin.tls]` is configured but its files cannot be used: connections are closed rather
    /// than served in clear text.
    Broken,
}

fn mode_for(config: &Config) -> Mode {
    let Some(tls) = config.admin.as_ref().and_then(|a| a.tls.as_ref()) else {
        return Mode::Plain;
    };
    match server_config(tls) {
        Ok(server) => Mode::Tls(TlsAcceptor::from(server)),
        Err((key, message)) => {
            tracing::error!(%key, %message, "admin endpoint: TLS cannot be set up; closing connections until a reload fixes it");
            Mode::Broken
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    mut config: watch::Receiver<Arc<Config>>,
    tx: mpsc::Sender<(Connection, SocketAddr)>,
) {
    let mut mode = mode_for(&config.borrow_and_update());
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::debug!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin endpoint: too many connections; closing a new one");
            continue;
        };
        if config.has_changed().unwrap_or(false) {
            mode = mode_for(&config.borrow_and_update());
        }
        match &mode {
            Mode::Plain => {
                let connection = Connection::new(Either::Right(tcp), slot);
                if tx.send((connection, peer)).await.is_err() {
                    return;
                }
            }
            Mode::Tls(acceptor) => {
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx
                                .send((Connection::new(Either::Left(tls), slot), peer))
                                .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin endpoint: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin endpoint: TLS handshake timed out"),
                    }
                });
            }
            Mode::Broken => {}
        }
    }
}

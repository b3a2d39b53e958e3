//! TLS for the Kafka security tests: certificates made at run time, and a TLS listener in front
//! of the broker. Tansu 0.6 serves no TLS itself: `tansu broker` refuses `--cert` together with
//! `--key` (one clap group), and its listener never uses the TLS acceptor it builds. So the test
//! broker is reached the way a TLS-terminating load balancer in front of Kafka is: librdkafka does
//! the real handshake (OpenSSL, certificate and host name verification) with this listener, which
//! passes the decrypted Kafka protocol, SASL exchange included, on to Tansu.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A CA and a broker certificate for 127.0.0.1 and localhost it signed, plus an unrelated CA,
/// written as PEM files (`ca.pem`, `other-ca.pem`) into a temporary directory.
pub struct Certificates {
    pub dir: tempfile::TempDir,
    /// The CA that signed the broker's certificate: what `ssl.ca.location` must name.
    pub ca: PathBuf,
    /// A CA that signed nothing the broker presents.
    pub other_ca: PathBuf,
    /// The broker's certificate and key as PEM files, for servers that read them (the admin
    /// endpoint's `[admin.tls]`).
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

impl Certificates {
    pub fn generate() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let (ca_params, ca_key, ca_pem) = ca("edgegate test CA");
        let (_, _, other_pem) = ca("edgegate unrelated test CA");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "edgegate test broker");
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca = dir.path().join("ca.pem");
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        std::fs::write(&other_ca, other_pem).unwrap();
        let server_cert_file = dir.path().join("server.pem");
        let server_key_file = dir.path().join("server-key.pem");
        std::fs::write(&server_cert_file, cert.pem()).unwrap();
        std::fs::write(&server_key_file, key.serialize_pem()).unwrap();
        Certificates {
            dir,
            ca,
            other_ca,
            server_cert_file,
            server_key_file,
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
        }
    }

    fn server_config(&self) -> ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone())),
            )
            .unwrap()
    }
}

/// A TLS listener on a free loopback port forwarding each connection, once its handshake
/// succeeded, to `upstream` in plain text. Counts the connections and the handshakes.
pub struct TlsProxy {
    pub port: u16,
    accepted: Arc<AtomicU64>,
    handshakes: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsProxy {
    pub fn start(certificates: &Certificates, upstream: u16) -> TlsProxy {
        TlsProxy::start_on(super::free_port(), certificates, upstream)
    }

    pub fn start_on(port: u16, certificates: &Certificates, upstream: u16) -> TlsProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(certificates.server_config()));
        let accepted = Arc::new(AtomicU64::new(0));
        let handshakes = Arc::new(AtomicU64::new(0));
        // Bound here, so that clients connect as soon as this returns.
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        runtime.spawn(accept_loop(
            listener,
            acceptor,
            upstream,
            accepted.clone(),
            handshakes.clone(),
        ));
        TlsProxy {
            port,
            accepted,
            handshakes,
            runtime: Some(runtime),
        }
    }

    /// TCP connections accepted so far: one per connection attempt of a client.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// TLS handshakes that succeeded so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections were accepted: a client that keeps retrying.
    pub fn wait_accepted(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.accepted() < n {
            assert!(
                Instant::now() < deadline,
                "{} connection attempts of {n} within {timeout:?}",
                self.accepted()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        // Tests may drop it inside their own runtime, where a blocking shutdown panics.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    upstream: u16,
    accepted: Arc<AtomicU64>,
    handshakes: Arc<AtomicU64>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let (acceptor, handshakes) = (acceptor.clone(), handshakes.clone());
        tokio::spawn(async move {
            // A client that does not trust the certificate aborts the handshake here.
            let Ok(mut tls) = acceptor.accept(client).await else {
                return;
            };
            handshakes.fetch_add(1, Ordering::SeqCst);
            let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
            else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
        });
    }
}

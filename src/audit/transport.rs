//! Connections to the SIEM for the shipper: `udp://` (a connected datagram socket), `tcp://`
//! and `tls://` (RFC 5425, rustls with the ring provider), and the capped, jittered exponential
//! backoff between attempts. Framing lives in the spool (records are already octet-counted).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

/// How messages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// RFC 5426: one datagram per message.
    Udp,
    /// RFC 6587 octet counting over plain TCP.
    Tcp,
    /// RFC 5425: octet counting over TLS.
    Tls,
}

/// A parsed `audit.syslog.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// The scheme.
    pub scheme: Scheme,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port (default 514, or 6514 for TLS).
    pub port: u16,
}

/// Parses `udp://host:port`, `tcp://host:port` or `tls://host:port` (`[v6]:port` too).
pub(crate) fn parse_url(url: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?}: expected udp://, tcp:// or tls://HOST:PORT"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "udp" => Scheme::Udp,
        "tcp" => Scheme::Tcp,
        "tls" => Scheme::Tls,
        other => {
            return Err(format!(
                "{url:?}: unknown scheme {other:?} (udp, tcp or tls)"
            ))
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!("{url:?}: expected HOST:PORT after the scheme"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
        None if scheme == Scheme::Tls => 6514,
        None => 514,
    };
    Ok(Endpoint {
        scheme,
        host: host.to_owned(),
        port,
    })
}

/// A byte stream to the SIEM (plain TCP or TLS).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open connection.
pub(crate) enum Conn {
    /// A connected datagram socket.
    Udp(UdpSocket),
    /// TCP or TLS.
    Stream(Box<dyn Stream>),
}

/// TLS settings for `tls://`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsFiles<'a> {
    /// CA bundle that signs the SIEM's certificate (default: the system's roots).
    pub ca: Option<&'a Path>,
    /// Client certificate chain for mutual TLS.
    pub client_cert: Option<&'a Path>,
    /// Its private key.
    pub client_key: Option<&'a Path>,
    /// Name to verify instead of the URL's host.
    pub server_name: Option<&'a str>,
}

/// Knows how to (re)connect to the SIEM.
pub(crate) struct Transport {
    endpoint: Endpoint,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl Transport {
    /// Builds the transport; for TLS this reads the CA and client files now, so a bad file is a
    /// startup error rather than an endless reconnect loop.
    pub fn new(
        endpoint: Endpoint,
        tls: &TlsFiles<'_>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Transport> {
        let tls = match endpoint.scheme {
            Scheme::Tls => {
                let name = tls.server_name.unwrap_or(&endpoint.host).to_owned();
                let name = ServerName::try_from(name.clone())
                    .map_err(|_| anyhow!("{name:?} is not a valid TLS server name"))?;
                Some((tls_connector(tls)?, name))
            }
            _ => None,
        };
        Ok(Transport {
            endpoint,
            tls,
            connect_timeout,
        })
    }

    /// The endpoint, for logs.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One connection attempt (all resolved addresses in turn), bounded by the connect timeout.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        tokio::time::timeout(self.connect_timeout, self.connect_inner())
            .await
            .map_err(|_| anyhow!("timed out after {:?}", self.connect_timeout))?
    }

    async fn connect_inner(&self) -> anyhow::Result<Conn> {
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.endpoint.host.as_str(), self.endpoint.port))
                .await
                .with_context(|| format!("resolving {}", self.endpoint.host))?
                .collect();
        let mut last = anyhow!("{} resolved to no address", self.endpoint.host);
        for addr in addrs {
            match self.connect_addr(addr).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.context(addr.to_string()),
            }
        }
        Err(last)
    }

    async fn connect_addr(&self, addr: SocketAddr) -> anyhow::Result<Conn> {
        if self.endpoint.scheme == Scheme::Udp {
            let local: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let socket = UdpSocket::bind(local).await?;
            socket.connect(addr).await?;
            return Ok(Conn::Udp(socket));
        }
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Conn::Stream(Box::new(tcp))),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(handshake_error)?;
                Ok(Conn::Stream(Box::new(tls)))
            }
        }
    }
}

/// A failed handshake, in plain words when it is one of the usual certificate mistakes (the
/// rustls error stays in brackets, for searching).
fn handshake_error(e: std::io::Error) -> anyhow::Error {
    match crate::tls::explain_tls_failure(&e, crate::tls::TlsPeer::Syslog) {
        Some(plain) => anyhow!("TLS handshake failed: {plain} [{e}]"),
        None => anyhow::Error::new(e).context("TLS handshake"),
    }
}

/// A rustls client config from the CA and optional client certificate files.
pub(crate) fn tls_connector(files: &TlsFiles<'_>) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    match files.ca {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading CA file {}", ca.display()))?;
            for cert in certs {
                let cert = cert.with_context(|| format!("parsing CA file {}", ca.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("CA file {}", ca.display()))?;
            }
            if roots.is_empty() {
                bail!("CA file {} holds no certificate", ca.display());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                bail!("no CA given and no system CA certificates found");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (files.client_cert, files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading client certificate {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing client certificate {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading client key {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("client_cert and client_key go together"),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Capped exponential backoff with "equal jitter": half the step fixed, half random.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubles per attempt, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// After a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_urls() {
        let e = parse_url("tls://siem.example.com:6514").unwrap();
        assert_eq!(
            e,
            Endpoint {
                scheme: Scheme::Tls,
                host: "siem.example.com".into(),
                port: 6514
            }
        );
        assert_eq!(parse_url("udp://10.0.0.1").unwrap().port, 514);
        assert_eq!(parse_url("tls://h").unwrap().port, 6514);
        let v6 = parse_url("tcp://[::1]:601").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 601));
        for bad in [
            "siem:514",
            "http://h:1",
            "tcp://:514",
            "tcp://h:0",
            "tcp://h:x",
            "tcp://h:1/path",
            "tcp://[::1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(
            late >= Duration::from_secs(1) && late <= Duration::from_secs(2),
            "{late:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    /// A TLS server on 127.0.0.1 presenting `cert`; accepts (and fails) handshakes forever.
    async fn tls_server(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> u16 {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        port
    }

    fn certificate(is_ca: bool, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        if is_ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        (params.self_signed(&key).unwrap(), key)
    }

    /// Connects to `port` trusting `ca` and returns the error text, as the shipper logs it.
    async fn handshake_failure(port: u16, ca: &rcgen::Certificate, server_name: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let endpoint = parse_url(&format!("tls://127.0.0.1:{port}")).unwrap();
        let files = TlsFiles {
            ca: Some(&ca_file),
            server_name: Some(server_name),
            ..TlsFiles::default()
        };
        let transport = Transport::new(endpoint, &files, Duration::from_secs(5)).unwrap();
        match transport.connect().await {
            Ok(_) => panic!("the handshake must fail"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[tokio::test]
    async fn a_ca_certificate_on_the_siem_is_explained() {
        // What `openssl req -x509` makes: self-signed with basicConstraints CA:TRUE.
        let (cert, key) = certificate(true, &["localhost"]);
        let port = tls_server(&cert, &key).await;
        let text = handshake_failure(port, &cert, "localhost").await;
        assert!(
            text.contains("the SIEM's certificate is a CA certificate (basicConstraints CA:TRUE"),
            "{text}"
        );
        assert!(
            text.contains("issue a server certificate from that CA"),
            "{text}"
        );
        assert!(
            text.contains("CaUsedAsEndEntity"),
            "the raw error stays: {text}"
        );
    }

    #[tokio::test]
    async fn unknown_issuer_and_wrong_name_are_explained() {
        let (cert, key) = certificate(false, &["siem.example.com"]);
        let port = tls_server(&cert, &key).await;
        let (stranger, _) = certificate(false, &["other.example.com"]);
        let text = handshake_failure(port, &stranger, "siem.example.com").await;
        assert!(
            text.contains("not signed by a CA this side trusts"),
            "{text}"
        );
        assert!(text.contains("audit.syslog.ca"), "{text}");
        let text = handshake_failure(port, &cert, "localhost").await;
        assert!(
            text.contains("not valid for \"localhost\"; it names siem.example.com"),
            "{text}"
        );
        assert!(text.contains("audit.syslog.server_name"), "{text}");
    }

    #[test]
    fn tls_config_needs_both_client_files() {
        let files = TlsFiles {
            client_cert: Some(Path::new("/nonexistent")),
            ..TlsFiles::default()
        };
        assert!(tls_connector(&files).is_err());
    }
}

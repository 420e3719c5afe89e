//! TLS both ways: terminating client TLS (rustls, HTTP/1.1 and HTTP/2 by ALPN, TLS 1.2+, optional
//! client certificates) with a certificate that can be replaced while connections stay up, and the
//! client configuration for an https upstream.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use serde::Deserialize;

/// `tls:`: terminate TLS on the proxy listener.
#[derive(schemars::JsonSchema, Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves whichever certificate was loaded last; new handshakes pick up a renewed certificate,
/// established connections are untouched.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: CertifiedKey) -> Self {
        CertResolver {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// Replaces the served certificate.
    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read certificate: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: bad certificate PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a certificate chain and its private key and checks that they belong together. Every
/// message names the file that is wrong: the certificate file when the certificate does not
/// parse, the key file when the key does not, and both when they do not belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = load_certs(cert)?;
    // A PEM block that decodes but holds no X.509 certificate would otherwise only surface when
    // the key is matched against it, and be reported as a bad key.
    if let Some(Err(e)) = chain
        .first()
        .map(rustls::server::ParsedCertificate::try_from)
    {
        return Err(format!(
            "{}: the first certificate is not a valid X.509 certificate ({e}): expected PEM \
             \"-----BEGIN CERTIFICATE-----\" blocks, the server's own certificate first",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read private key: {e}", key.display()))?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{}: the private key does not match the certificate {}",
            key.display(),
            cert.display()
        ),
        rustls::Error::InvalidCertificate(e) => {
            format!("{}: unusable certificate: {e}", cert.display())
        }
        other => format!("{}: unusable private key: {other}", key.display()),
    })
}

/// Builds the server configuration for the proxy listener.
pub fn server_config(tls: &TlsConfig, resolver: Arc<CertResolver>) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = root_store(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("{}: unusable client CA: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificates of a CA bundle as a root store.
pub fn root_store(ca: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: bad CA certificate: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// The operating system's trusted roots.
pub fn native_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

/// The TLS client configuration for the upstream: the given CA, or the system roots.
pub fn upstream_client_config(ca: Option<&Path>) -> Result<ClientConfig, String> {
    let roots = match ca {
        Some(ca) => root_store(ca)?,
        None => native_roots(),
    };
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The far end of a TLS connection this process opens, for [`explain_tls_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPeer {
    /// The SIEM behind `audit.syslog.url` (`tls://`).
    Syslog,
    /// An https `upstream`.
    Upstream,
}

impl TlsPeer {
    fn what(self) -> &'static str {
        match self {
            TlsPeer::Syslog => "the SIEM",
            TlsPeer::Upstream => "the upstream",
        }
    }

    fn ca_setting(self) -> &'static str {
        match self {
            TlsPeer::Syslog => "audit.syslog.ca",
            TlsPeer::Upstream => "upstream_tls.ca",
        }
    }

    fn name_setting(self) -> &'static str {
        match self {
            TlsPeer::Syslog => "the host in audit.syslog.url, or audit.syslog.server_name",
            TlsPeer::Upstream => "the host in upstream",
        }
    }
}

/// The rustls error somewhere in `error`'s chain: directly, as a source, or inside an
/// `io::Error` (which is how tokio-rustls and hyper hand it over; `io::Error::source` skips it).
pub fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// A plain sentence for the common ways a server certificate is refused (a CA certificate used
/// as the server's own, an unknown issuer, the wrong name, expired, not yet valid, not for
/// server use) and for a server that refuses this side's client certificate: what is wrong and
/// what to do. `None` for any other failure, which the caller reports as it is.
pub fn explain_tls_failure(
    error: &(dyn std::error::Error + 'static),
    peer: TlsPeer,
) -> Option<String> {
    use rustls::{AlertDescription, CertificateError};
    let what = peer.what();
    let ca = peer.ca_setting();
    let text = match find_rustls_error(error)? {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Other(other) if other.to_string() == "CaUsedAsEndEntity" => format!(
                "{what}'s certificate is a CA certificate (basicConstraints CA:TRUE, which \
                 `openssl req -x509` sets by default), not a server certificate, and a CA \
                 certificate cannot identify a server: issue a server certificate from that CA \
                 (CA:FALSE, extendedKeyUsage serverAuth, subjectAltName naming the host) for \
                 {what} and put the CA in {ca}; or give {what} a self-signed certificate \
                 without CA:TRUE (openssl req -x509 ... -addext basicConstraints=critical,CA:FALSE \
                 -addext subjectAltName=DNS:HOST) and put that certificate in {ca}"
            ),
            CertificateError::UnknownIssuer => format!(
                "{what}'s certificate is not signed by a CA this side trusts: set {ca} to the \
                 PEM file of the CA that issued it (without {ca} the system's CA certificates \
                 are used); if {what} sends only its own certificate, have it send the \
                 intermediate CA certificates too"
            ),
            CertificateError::BadSignature => format!(
                "{what}'s certificate names a CA in {ca} as its issuer but was not signed by \
                 that CA's key (a CA made again under the same name?): put the CA that really \
                 issued it in {ca}"
            ),
            CertificateError::NotValidForName => format!(
                "{what}'s certificate is not valid for the name connected to: use a name the \
                 certificate carries in its subjectAltName ({}), or reissue it for this name",
                peer.name_setting()
            ),
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "{what}'s certificate is not valid for {name:?}; it names {names}: use one of \
                 those names ({setting}), or reissue the certificate with subjectAltName {name}",
                name = expected.to_str(),
                names = match presented.as_slice() {
                    [] => "no host in its subjectAltName".to_string(),
                    list => list
                        .iter()
                        .map(|n| presented_name(n))
                        .collect::<Vec<_>>()
                        .join(", "),
                },
                setting = peer.name_setting(),
            ),
            CertificateError::Expired => format!(
                "{what}'s certificate has expired: renew it on {what} (if it has not, this \
                 machine's clock is wrong)"
            ),
            CertificateError::ExpiredContext { time, not_after } => format!(
                "{what}'s certificate expired at {} (it is now {}): renew it on {what} (if it \
                 has not, this machine's clock is wrong)",
                timestamp(not_after.as_secs()),
                timestamp(time.as_secs()),
            ),
            CertificateError::NotValidYet => format!(
                "{what}'s certificate is not valid yet: check the clocks of {what} and of this \
                 machine"
            ),
            CertificateError::NotValidYetContext { time, not_before } => format!(
                "{what}'s certificate is valid only from {} (it is now {}): check the clocks of \
                 {what} and of this machine",
                timestamp(not_before.as_secs()),
                timestamp(time.as_secs()),
            ),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!(
                    "{what}'s certificate is not for TLS servers (its extendedKeyUsage lacks \
                     serverAuth): reissue it with extendedKeyUsage serverAuth"
                )
            }
            CertificateError::BadEncoding => {
                format!("{what} sent a certificate that is not valid X.509 (cannot be parsed)")
            }
            _ => return None,
        },
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => match peer {
            TlsPeer::Syslog => format!(
                "{what} asks for a client certificate (mutual TLS) and none was sent: set \
                 audit.syslog.client_cert and audit.syslog.client_key"
            ),
            TlsPeer::Upstream => format!(
                "{what} asks for a client certificate (mutual TLS); portcullis sends none to \
                 an upstream, so lift that requirement for it"
            ),
        },
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA | AlertDescription::BadCertificate,
        ) if peer == TlsPeer::Syslog => format!(
            "{what} refused this side's client certificate: it must be signed by a CA that \
             {what} trusts and be meant for clients (extendedKeyUsage clientAuth)"
        ),
        _ => return None,
    };
    Some(text)
}

/// `DnsName("siem.example.com")`, as webpki lists the names it found, as `siem.example.com`.
fn presented_name(name: &str) -> &str {
    name.split_once('(')
        .filter(|(kind, _)| kind.chars().all(|c| c.is_ascii_alphanumeric()))
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map_or(name, |inner| inner.trim_matches('"'))
}

fn timestamp(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s after 1970"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn loads_a_matching_pair_and_refuses_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = write_pair(dir.path(), "a");
        let (_, key_b) = write_pair(dir.path(), "b");
        assert!(load_certified_key(&cert_a, &key_a).is_ok());
        let err = load_certified_key(&cert_a, &key_b).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err = load_certified_key(&dir.path().join("missing.crt"), &key_a).unwrap_err();
        assert!(err.contains("cannot read certificate"), "{err}");
        std::fs::write(dir.path().join("empty.crt"), "").unwrap();
        let err = load_certified_key(&dir.path().join("empty.crt"), &key_a).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn a_garbage_certificate_is_blamed_on_the_certificate_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = write_pair(dir.path(), "a");
        // Valid PEM and base64, but not X.509 inside.
        let garbage = dir.path().join("cert.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSwgbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_certified_key(&garbage, &key).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: ", garbage.display())),
            "{err}"
        );
        assert!(err.contains("not a valid X.509 certificate"), "{err}");
        assert!(!err.contains("private key"), "{err}");
        // A garbage key next to a good certificate is still blamed on the key.
        let (cert, _) = write_pair(dir.path(), "b");
        let bad_key = dir.path().join("key.pem");
        std::fs::write(
            &bad_key,
            "-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load_certified_key(&cert, &bad_key).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: ", bad_key.display())),
            "{err}"
        );
    }

    #[test]
    fn certificate_failures_are_explained_through_io_and_anyhow_wrappers() {
        use rustls::CertificateError;
        use rustls_pki_types::UnixTime;
        use std::time::Duration;
        let wrapped = |e: rustls::Error| {
            anyhow::Error::new(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                .context("TLS handshake")
                .context("127.0.0.1:6514")
        };
        let explain = |e: &anyhow::Error, peer| explain_tls_failure(e.as_ref(), peer);
        let expired = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::ExpiredContext {
                time: UnixTime::since_unix_epoch(Duration::from_secs(1_767_225_600)),
                not_after: UnixTime::since_unix_epoch(Duration::from_secs(1_735_689_600)),
            },
        ));
        let text = explain(&expired, TlsPeer::Syslog).unwrap();
        assert!(
            text.contains("the SIEM's certificate expired at 2025-01-01T00:00:00Z"),
            "{text}"
        );
        let unknown = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let text = explain(&unknown, TlsPeer::Upstream).unwrap();
        assert!(text.contains("the upstream's certificate"), "{text}");
        assert!(text.contains("upstream_tls.ca"), "{text}");
        let other = wrapped(rustls::Error::DecryptError);
        assert_eq!(explain(&other, TlsPeer::Syslog), None);
        let plain = anyhow::anyhow!("connection refused");
        assert_eq!(explain(&plain, TlsPeer::Syslog), None);
    }
}

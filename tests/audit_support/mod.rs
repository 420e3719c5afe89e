//! A real rsyslog receiver for the audit interop tests: its own temp dir, config, pid file and
//! loopback port per test; writes every portcullis message raw (`%rawmsg%`), one per line.
//! Killed by PID on drop. A missing `rsyslogd` is a test failure, not a skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any wait in these tests may take.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` every 20 ms until it returns `Some`, failing the test after [`PATIENCE`].
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` with a deadline of [`PATIENCE`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?}: {what}"))
}

/// A free loopback TCP port (the listener is closed again).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback UDP port.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PEM files of a per-test CA, a server certificate for `127.0.0.1`/`localhost` and a client
/// certificate.
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    /// Generates a fresh CA and leaf certificates into `dir`.
    pub fn generate(dir: &Path) -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "portcullis audit test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |cn: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![usage];
            (p.signed_by(&key, &ca, &ca_key).unwrap(), key)
        };
        let (server, server_key) = leaf(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            "portcullis",
            vec!["portcullis.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        Certs {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
        }
    }
}

/// What rsyslog listens for.
#[derive(Debug, Clone)]
pub enum Listen {
    /// imtcp, plain (octet-counted or LF framing, auto-detected).
    Tcp,
    /// imudp.
    Udp,
    /// imtcp with a TLS stream driver (`gtls` or `ossl`); `mutual` requires a client certificate.
    Tls {
        certs: Certs,
        driver: &'static str,
        mutual: bool,
    },
}

/// A running (or stopped) rsyslogd.
pub struct Rsyslog {
    dir: PathBuf,
    listen: Listen,
    pub port: u16,
    child: Option<Child>,
}

/// The rsyslogd binary; panics (fails the test) when it is not installed.
fn rsyslogd() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("rsyslogd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "rsyslogd is not installed: the audit interop tests need a real rsyslog \
                 (Debian: bash .ci/install-test-deps rsyslog rsyslog-gnutls rsyslog-openssl)"
            )
        })
}

/// Fails the test with the package to install when an rsyslog module is missing.
fn require_module(file: &str) {
    let roots = ["/usr/lib", "/usr/lib64", "/usr/local/lib"];
    let mut dirs: Vec<PathBuf> = roots.iter().map(|r| Path::new(r).join("rsyslog")).collect();
    for root in roots {
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            dirs.push(entry.path().join("rsyslog"));
        }
    }
    if !dirs.iter().any(|d| d.join(file).is_file()) {
        let package = if file.contains("gtls") {
            "rsyslog-gnutls"
        } else {
            "rsyslog-openssl"
        };
        panic!("rsyslog module {file} is not installed (Debian package {package})");
    }
}

impl Rsyslog {
    /// Starts rsyslog on a fresh port in `dir` and waits until it accepts.
    pub async fn start(dir: &Path, listen: Listen) -> Rsyslog {
        let port = match listen {
            Listen::Udp => free_udp_port(),
            _ => free_tcp_port(),
        };
        let mut r = Rsyslog::configure(dir, listen, port);
        r.restart().await;
        r
    }

    /// Writes the config for `port` without starting (for tests that start it later).
    pub fn configure(dir: &Path, listen: Listen, port: u16) -> Rsyslog {
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let r = Rsyslog {
            dir: dir.to_owned(),
            listen,
            port,
            child: None,
        };
        std::fs::write(r.conf_path(), r.config()).unwrap();
        r
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.join("rsyslog.conf")
    }

    /// Where the raw portcullis messages land, one per line.
    pub fn out_path(&self) -> PathBuf {
        self.dir.join("out.log")
    }

    /// The URL an Auditor should use.
    pub fn url(&self) -> String {
        let scheme = match self.listen {
            Listen::Tcp => "tcp",
            Listen::Udp => "udp",
            Listen::Tls { .. } => "tls",
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        let port = self.port;
        let (globals, module, input) = match &self.listen {
            Listen::Tcp => (String::new(), "module(load=\"imtcp\")".to_owned(), "imtcp"),
            Listen::Udp => (String::new(), "module(load=\"imudp\")".to_owned(), "imudp"),
            Listen::Tls {
                certs,
                driver,
                mutual,
            } => (
                format!(
                    "DefaultNetstreamDriverCAFile=\"{}\" DefaultNetstreamDriverCertFile=\"{}\" \
                     DefaultNetstreamDriverKeyFile=\"{}\"",
                    certs.ca.display(),
                    certs.server_cert.display(),
                    certs.server_key.display()
                ),
                format!(
                    "module(load=\"imtcp\" StreamDriver.Name=\"{driver}\" StreamDriver.Mode=\"1\" \
                     StreamDriver.AuthMode=\"{}\")",
                    if *mutual { "x509/certvalid" } else { "anon" }
                ),
                "imtcp",
            ),
        };
        format!(
            "global(workDirectory=\"{d}/work\" maxMessageSize=\"64k\" net.enableDNS=\"off\" {globals})\n\
             {module}\n\
             input(type=\"{input}\" port=\"{port}\" address=\"127.0.0.1\")\n\
             template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
             if $app-name == \"portcullis\" then {{\n\
               action(type=\"omfile\" file=\"{d}/out.log\" template=\"raw\")\n\
               stop\n\
             }}\n\
             action(type=\"omfile\" file=\"{d}/other.log\" template=\"raw\")\n"
        )
    }

    /// Starts (again) on the same port and output file, waiting until it accepts.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "rsyslog is already running");
        if let Listen::Tls { driver, .. } = &self.listen {
            require_module(&format!("lmnsd_{driver}.so"));
        }
        let log = std::fs::File::create(self.dir.join("rsyslogd.stderr")).unwrap();
        let child = Command::new(rsyslogd())
            .arg("-n")
            .arg("-f")
            .arg(self.conf_path())
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning rsyslogd");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let port = self.port;
        let udp = matches!(self.listen, Listen::Udp);
        let other = self.dir.join("other.log");
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let end = Instant::now() + PATIENCE;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("rsyslogd exited with {status}: {}", self.diagnostics());
            }
            let ready = if udp {
                let _ = probe.send_to(b"<13>1 - - probe - - - ready", ("127.0.0.1", port));
                std::fs::read_to_string(&other).is_ok_and(|s| s.contains("ready"))
            } else {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < end,
                "rsyslog did not listen on {port} within {PATIENCE:?}: {}",
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// rsyslogd's stderr and its own messages, for failure reports.
    fn diagnostics(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "stderr: {}\nrsyslog messages: {}",
            read("rsyslogd.stderr"),
            read("other.log")
        )
    }

    /// Stops it with SIGTERM (a clean shutdown) and waits for the process to end.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            eventually("rsyslogd to exit", || child.try_wait().ok().flatten()).await;
        }
    }

    /// Kills it with SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The raw messages received so far.
    pub fn messages(&self) -> Vec<String> {
        std::fs::read_to_string(self.out_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Every byte received so far.
    pub fn raw_bytes(&self) -> Vec<u8> {
        let mut all = std::fs::read(self.out_path()).unwrap_or_default();
        all.extend(std::fs::read(self.dir.join("other.log")).unwrap_or_default());
        all
    }

    /// Waits until at least `n` messages arrived; returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<String> {
        eventually(&format!("{n} messages at rsyslog"), || {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
        .await
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A parsed audit message: its SD params (unescaped, in order) and its JSON MSG.
#[derive(Debug)]
pub struct Received {
    pub params: Vec<(String, String)>,
    pub json: serde_json::Value,
}

impl Received {
    /// Parses a raw RFC 5424 line with `syslog_loose`.
    pub fn parse(line: &str) -> Received {
        let m = syslog_loose::parse_message(line, syslog_loose::Variant::RFC5424);
        let sd = m
            .structured_data
            .first()
            .unwrap_or_else(|| panic!("no structured data in {line}"));
        let params = sd.params().map(|(k, v)| (k.to_string(), v)).collect();
        let json =
            serde_json::from_str(m.msg).unwrap_or_else(|e| panic!("MSG not JSON ({e}): {line}"));
        Received { params, json }
    }

    /// One SD param.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `event_id` split into boot id and sequence number.
    pub fn id(&self) -> (String, u64) {
        let id = self.param("event_id").expect("event_id");
        let (boot, seq) = id.rsplit_once('-').expect("boot-seq");
        (boot.to_owned(), seq.parse().expect("numeric seq"))
    }
}

/// The `(boot, seq)` ids of all lines, in arrival order.
pub fn ids(lines: &[String]) -> Vec<(String, u64)> {
    lines.iter().map(|l| Received::parse(l).id()).collect()
}

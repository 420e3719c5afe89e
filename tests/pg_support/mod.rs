//! A real PostgreSQL 15 per test: `initdb` into a temp folder as the `postgres` user, the server
//! on a free loopback port with `fsync=off`, a `portcullis` role with a password (host logins
//! use scram-sha-256, so the password really is checked), optionally TLS with a certificate made
//! for the test. Stopped by PID when dropped. A missing PostgreSQL fails the test loudly.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The password the `portcullis` role logs in with.
pub const PASSWORD: &str = "Pg-s3cret-never-logged";

/// Where Debian's PostgreSQL 15 puts its programs.
fn bin(name: &str) -> PathBuf {
    for dir in ["/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "PostgreSQL's {name} is not installed (Debian: apt-get install postgresql-15; .ci/run installs it)"
    );
}

/// TLS material for a server started with `ssl=on`.
pub struct PgTls {
    /// The CA that signed the server certificate, PEM.
    pub ca: PathBuf,
}

/// A running PostgreSQL.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub tls: Option<PgTls>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

impl Postgres {
    /// A fresh cluster without TLS.
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// A fresh cluster serving TLS with a certificate for 127.0.0.1 and localhost.
    pub fn start_tls() -> Postgres {
        Postgres::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let dir = tempfile::Builder::new().prefix("pg-").tempdir().unwrap();
        let owned = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(owned.success(), "chown the PostgreSQL folder");
        let data = dir.path().join("data");
        let init = as_postgres(&bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let tls = tls.then(|| write_tls(dir.path()));
        let mut pg = Postgres {
            port: free_port(),
            dir,
            child: None,
            tls,
        };
        pg.run();
        pg.psql(&format!(
            "CREATE ROLE portcullis LOGIN PASSWORD '{PASSWORD}'"
        ));
        pg.psql("CREATE DATABASE portcullis OWNER portcullis");
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again, on the same port and data) and waits until it answers.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = as_postgres(&bin("postgres"));
        command
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "logging_collector=off",
            ]);
        if self.tls.is_some() {
            command
                .args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    self.dir.path().join("server.crt").display()
                ))
                .arg("-c")
                .arg(format!(
                    "ssl_key_file={}",
                    self.dir.path().join("server.key").display()
                ));
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .unwrap();
            if ready.success() {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `runuser` does not pass signals on: stop the postmaster itself, by its pid file.
            let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().map(str::to_string))
                .unwrap_or_else(|| child.id().to_string());
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Runs SQL as the superuser over the local socket.
    pub fn psql(&self, sql: &str) -> String {
        let out = as_postgres(&bin("psql"))
            .args(["-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// SQL in the `portcullis` database.
    pub fn query(&self, sql: &str) -> String {
        let out = as_postgres(&bin("psql"))
            .args(["-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "portcullis",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The URL portcullis is given (password in it).
    pub fn url(&self) -> String {
        format!(
            "postgres://portcullis:{PASSWORD}@127.0.0.1:{}/portcullis?sslmode=disable",
            self.port
        )
    }

    /// The URL without the password (it comes from `PGPASSWORD`).
    pub fn url_without_password(&self, sslmode: &str) -> String {
        format!(
            "postgres://portcullis@127.0.0.1:{}/portcullis?sslmode={sslmode}",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_tls(dir: &Path) -> PgTls {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    for f in ["server.crt", "server.key"] {
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.join(f))
            .status();
    }
    let _ = Command::new("chmod")
        .arg("600")
        .arg(dir.join("server.key"))
        .status();
    PgTls { ca: ca_path }
}

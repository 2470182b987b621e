//! The stand-in for the Kubernetes API server's Lease endpoints
//! (`lease_apiserver.py`, which needs `python3`), over HTTPS with a test
//! CA, a service account token file and a history of every write.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::pki::server_pki;
use crate::process::spawn_until_first_line;

/// A running `lease_apiserver.py`, killed on drop.
pub struct LeaseApiServer {
    child: Child,
    /// `https://localhost:PORT`.
    pub url: String,
    /// The CA that signed its certificate.
    pub ca: PathBuf,
    /// The service account token it accepts.
    pub token_file: PathBuf,
    /// One JSON object per successful write.
    pub history: PathBuf,
}

impl LeaseApiServer {
    /// # Panics
    ///
    /// When it does not start (with its log).
    #[must_use]
    pub fn start(dir: &Path) -> LeaseApiServer {
        let pki = dir.join("kube-pki");
        std::fs::create_dir_all(&pki).expect("create the PKI directory");
        server_pki(&pki);
        let token_file = dir.join("sa-token");
        std::fs::write(&token_file, format!("sa-token-{}", std::process::id()))
            .expect("write the token");
        let history = dir.join("lease-history.jsonl");
        let log = dir.join("lease-apiserver.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("lease_apiserver.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg("--cert")
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--history")
            .arg(&history)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let (child, line) = spawn_until_first_line(cmd, &log, "lease_apiserver.py", 30);
        let port = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        LeaseApiServer {
            child,
            url: format!("https://localhost:{port}"),
            ca: pki.join("ca.pem"),
            token_file,
            history,
        }
    }

    /// The `[[reencrypt]]` lines that elect through this server, with
    /// `lease` added to `[reencrypt.lease]` (name, duration).
    #[must_use]
    pub fn election(&self, lease: &str) -> String {
        format!(
            "leader_election = \"kubernetes-lease\"\n[reencrypt.lease]\napi_server = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\nnamespace = \"rekey-test\"\n{lease}",
            self.url,
            self.ca.display(),
            self.token_file.display()
        )
    }

    /// Every successful write, oldest first.
    ///
    /// # Panics
    ///
    /// When a line of the history is not JSON.
    #[must_use]
    pub fn history(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.history)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

impl Drop for LeaseApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

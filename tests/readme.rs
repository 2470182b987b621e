//! The README's terminal sessions (its `console` blocks: `$ command`
//! lines, each followed by the output it shows) run verbatim against a
//! real backend, and print what the README says they print. Times, and
//! anything the README elides with `…`, may differ; everything else must
//! match. A command whose comment says it is refused must fail.

use std::path::{Path, PathBuf};

use rekey_testkit::console::{Console, sessions};
use rekey_testkit::*;

fn readme() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(p).expect("README.md")
}

#[test]
fn the_readme_sessions_print_what_they_show() {
    let sessions = sessions(&readme());
    assert!(!sessions.is_empty(), "the README has a console session");
    let bin_dir: PathBuf = CLI.path().parent().unwrap().to_path_buf();
    // The sidecar and backend are found the same way by the testkit.
    let _ = (BACKEND.path(), SIDECAR.path());
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for steps in sessions {
        let dir = TempDir::new("readme");
        // A session that names the README's Vault provider gets a real
        // OpenBao (dev server) behind it, and `bao` on its PATH.
        let vault = steps
            .iter()
            .any(|s| s.command.contains("--provider vault-main"))
            .then(|| Bao::dev(dir.path()));
        let mut opts = BackendOpts::default();
        let mut path = path.clone();
        let mut env = Vec::new();
        if let Some(bao) = &vault {
            let token_file = dir.path().join("vault-token");
            std::fs::write(&token_file, &bao.root_token).unwrap();
            opts.extra_toml = format!(
                "[[providers]]\nname = \"vault-main\"\ntype = \"vault\"\naddress = \"{}\"\nauth = \"token\"\ntoken_file = \"{}\"\n",
                bao.addr,
                token_file.display()
            );
            let bao_dir = bao_binary().parent().unwrap().to_path_buf();
            path = format!("{path}:{}", bao_dir.display());
            env = vec![
                ("BAO_ADDR", bao.addr.clone()),
                ("BAO_TOKEN", bao.root_token.clone()),
            ];
        }
        // One that names the AWS provider gets moto's server as ASM.
        let moto = steps
            .iter()
            .any(|s| s.command.contains("--provider aws-main"))
            .then(|| Moto::start(dir.path()));
        if let Some(m) = &moto {
            opts.extra_toml.push_str(&format!(
                "[[providers]]\nname = \"aws-main\"\ntype = \"aws-secrets-manager\"\nregion = \"eu-west-1\"\nendpoint_url = \"{}\"\n",
                m.endpoint()
            ));
            opts.env = m.env();
        }
        let b = Backend::start(dir.path(), opts);
        // The README's commands run where the backend keeps ./rekey-data.
        std::os::unix::fs::symlink(dir.path().join("data"), dir.path().join("rekey-data")).unwrap();
        let mut console = Console::new("the README", dir.path())
            .env("PATH", &path)
            .env("REKEY_ADDR", &b.grpc)
            .env_remove("REKEY_TOKEN")
            .env_remove("REKEY_TOKEN_FILE");
        for (k, v) in &env {
            console = console.env(k, v);
        }
        console.run_session(&steps);
    }
}

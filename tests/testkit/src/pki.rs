//! Test certificates made with `openssl`: a CA, a server certificate for
//! localhost and 127.0.0.1, and client certificates it signs.

use std::path::Path;
use std::process::Command;

use crate::process::succeed;

/// Runs `openssl` in `dir`.
///
/// # Panics
///
/// When it fails; with its output.
pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    succeed(Command::new("openssl").args(args).current_dir(dir));
}

/// `openssl req` arguments for a new P-256 key without a passphrase.
const NEW_EC_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A test CA (`ca.pem`, `ca.key`) and a server certificate it signed for
/// localhost and 127.0.0.1 (`server.pem`, `server.key`), in `dir`.
pub fn server_pki(dir: &Path) {
    let ca = [
        &["req", "-x509"],
        NEW_EC_KEY,
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ]
    .concat();
    openssl(
        dir,
        &[&ca[..], &["-days", "2", "-subj", "/CN=rekey-test-ca"]].concat(),
    );
    issue_cert(
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
}

/// A P-256 key `NAME.key` and a certificate `NAME.pem` for `subject`,
/// signed by the CA that [`server_pki`] made in `dir`, with the X.509
/// extensions `ext` (openssl's extfile syntax).
///
/// # Panics
///
/// When `openssl` fails.
pub fn issue_cert(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext).expect("write the extensions file");
    let req = [&["req"], NEW_EC_KEY].concat();
    openssl(
        dir,
        &[&req[..], &["-keyout", &key, "-out", &csr, "-subj", subject]].concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ],
    );
}

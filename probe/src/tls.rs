//! TLS for the connections the probes make themselves (Redis), and what a
//! TLS failure means, in words, for those and for Postgres (whose TLS
//! sqlx makes): a CA that did not sign the server's certificate, a
//! certificate for another host name, a port that does not speak TLS and
//! a refused client certificate each get a one-line reason of their own.
//!
//! Configurations are built on ring, never on the process's default
//! provider, so a probe works the same in every binary that links it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::{Error, Service};

/// The files and name a TLS connection is configured with: what an
/// operator writes. Paths are read when [`Tls::new`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificates to trust instead of the public CAs
    /// (webpki-roots, Mozilla's programme).
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate chain, for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's PEM private key.
    pub key_file: Option<PathBuf>,
    /// The name to send as SNI and to verify the server's certificate
    /// against, instead of the host connected to (nodes found by address,
    /// a certificate issued for a service name).
    pub server_name: Option<String>,
}

/// A ready client configuration: files read, names checked.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    /// The trusted CAs as messages name them.
    trust: String,
    service: Service,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("trust", &self.trust)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files and builds the configuration.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting whose file cannot be read or
    /// holds no usable PEM, or a server name that is not a DNS name or IP
    /// address.
    pub fn new(service: Service, files: &TlsFiles) -> Result<Tls, Error> {
        let config_error = |setting: &'static str, path: &Path, why: String| Error::Config {
            service,
            setting,
            reason: format!("{}: {why}", path.display()),
        };
        let (roots, trust) = match &files.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| config_error("CA file", path, format!("cannot read it: {e}")))?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| config_error("CA file", path, e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| config_error("CA file", path, e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(config_error(
                        "CA file",
                        path,
                        "holds no PEM certificate".into(),
                    ));
                }
                (roots, format!("the CA file {}", path.display()))
            }
            None => (
                RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                "the public CAs (webpki-roots)".to_string(),
            ),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config {
                service,
                setting: "TLS",
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        let config = match (&files.cert_file, &files.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = std::fs::read(cert)
                    .map_err(|e| {
                        config_error("client certificate", cert, format!("cannot read it: {e}"))
                    })
                    .and_then(|pem| {
                        CertificateDer::pem_slice_iter(&pem)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| config_error("client certificate", cert, e.to_string()))
                    })?;
                if chain.is_empty() {
                    return Err(config_error(
                        "client certificate",
                        cert,
                        "holds no PEM certificate".into(),
                    ));
                }
                let pem = zeroize::Zeroizing::new(std::fs::read(key).map_err(|e| {
                    config_error("client key", key, format!("cannot read it: {e}"))
                })?);
                let private = PrivateKeyDer::from_pem_slice(&pem)
                    .map_err(|e| config_error("client key", key, e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| config_error("client key", key, e.to_string()))?
            }
            _ => {
                return Err(Error::Config {
                    service,
                    setting: "client certificate",
                    reason: "a client certificate and its key are given together or not at all"
                        .into(),
                });
            }
        };
        let server_name = match &files.server_name {
            None => None,
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|_| Error::Config {
                service,
                setting: "TLS server name",
                reason: format!("{n:?} is not a DNS name or an IP address"),
            })?),
        };
        Ok(Tls {
            config: Arc::new(config),
            server_name,
            trust,
            service,
        })
    }

    /// The TLS handshake over `tcp` with `host` (the host part of the
    /// address connected to), verified against the configured server name
    /// when there is one.
    ///
    /// # Errors
    /// [`Error::Tls`] with the reason in words.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
        target: &str,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let name =
            match &self.server_name {
                Some(n) => n.clone(),
                None => ServerName::try_from(host.trim_matches(['[', ']']).to_string()).map_err(
                    |_| Error::Config {
                        service: self.service,
                        setting: "TLS server name",
                        reason: format!("{host:?} is not a DNS name or an IP address; set one"),
                    },
                )?,
            };
        let shown = name.to_str().into_owned();
        TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Tls {
                service: self.service,
                target: target.to_string(),
                reason: io_reason(&e, &shown, &self.trust),
            })
    }

    /// The reason for an I/O error on an established TLS connection (the
    /// server may refuse a client certificate only after the handshake).
    #[must_use]
    pub fn io_reason(&self, e: &std::io::Error, host: &str) -> String {
        io_reason(e, host, &self.trust)
    }
}

/// An I/O error from a TLS stream in words: its rustls error when it
/// carries one, else what a closed handshake most likely means.
pub(crate) fn io_reason(e: &std::io::Error, host: &str, trust: &str) -> String {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return reason(tls, host, trust);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            "the server closed the connection during the TLS handshake (a port without TLS?)".into()
        }
        _ => e.to_string(),
    }
}

/// A rustls error in words. `host` is the name the certificate was
/// checked against; `trust` names the CAs that were trusted.
#[must_use]
pub fn reason(e: &rustls::Error, host: &str, trust: &str) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the server's certificate is not signed by {trust} (a wrong CA, or none given)"
            ),
            // A CA of the same name that did not sign it.
            CertificateError::BadSignature => format!(
                "the server's certificate is not signed by {trust} (a CA of the same name, but not the one that signed it)"
            ),
            CertificateError::NotValidForName => {
                format!("the server's certificate is not valid for the host name {host}")
            }
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "the server's certificate is not valid for the host name {host} (it names {})",
                if presented.is_empty() {
                    "no host".to_string()
                } else {
                    presented
                        .iter()
                        .map(|n| bare_name(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (is the clock right?)".into()
            }
            other => format!("the server's certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(
            a @ (AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::HandshakeFailure
            | AlertDescription::AccessDenied),
        ) => format!(
            "the server ended the TLS handshake ({a:?}): it wants a client certificate, or refused the one given"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server did not answer in TLS (a port without TLS?)".into()
        }
        other => other.to_string(),
    }
}

/// A name as rustls presents it (`DnsName("db.internal")`,
/// `IpAddress(10.0.0.1)`) without the wrapping.
fn bare_name(presented: &str) -> &str {
    presented
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map_or(presented, |inner| inner.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_what_went_wrong() {
        let ca = "the CA file /etc/ca.pem";
        let r = reason(
            &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            "db",
            ca,
        );
        assert!(r.contains("not signed by the CA file /etc/ca.pem"), "{r}");
        let r = reason(
            &rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            "127.0.0.2",
            ca,
        );
        assert!(r.contains("not valid for the host name 127.0.0.2"), "{r}");
        assert_eq!(bare_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(bare_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(bare_name("plain"), "plain");
        let r = reason(
            &rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            "db",
            ca,
        );
        assert!(r.contains("client certificate"), "{r}");
        let r = reason(
            &rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            "db",
            ca,
        );
        assert!(r.contains("without TLS"), "{r}");
    }

    #[test]
    fn bad_files_name_their_setting() {
        let files = TlsFiles {
            ca_file: Some("/nonexistent/rekey-ca.pem".into()),
            ..TlsFiles::default()
        };
        let e = Tls::new(Service::Redis, &files).unwrap_err().to_string();
        assert!(
            e.starts_with("redis: CA file /nonexistent/rekey-ca.pem: cannot read it"),
            "{e}"
        );
        let files = TlsFiles {
            cert_file: Some("/x.pem".into()),
            ..TlsFiles::default()
        };
        let e = Tls::new(Service::Redis, &files).unwrap_err().to_string();
        assert!(e.contains("together"), "{e}");
        let files = TlsFiles {
            server_name: Some("not a name".into()),
            ..TlsFiles::default()
        };
        let e = Tls::new(Service::Redis, &files).unwrap_err().to_string();
        assert!(e.contains("not a DNS name"), "{e}");
        Tls::new(Service::Redis, &TlsFiles::default()).expect("public CAs");
    }
}

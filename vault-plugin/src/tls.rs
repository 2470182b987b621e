//! go-plugin's automatic mutual TLS. The host makes a certificate for
//! itself and hands it over in `PLUGIN_CLIENT_CERT`; the plugin makes one
//! at start and returns it in the handshake line. Each side then accepts
//! exactly the other's certificate, both on the plugin's own listener and
//! on the connections the plugin dials back to the host through the
//! broker.
//!
//! go-plugin makes its certificates with ECDSA P-521, which ring does not
//! verify; the handshake signatures of the host are checked with the
//! RustCrypto `p521` crate instead. The plugin's own key is ECDSA P-256.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{
    AlgorithmIdentifier, CertificateDer, InvalidSignature, PrivateKeyDer, PrivatePkcs8KeyDer,
    ServerName, SignatureVerificationAlgorithm, UnixTime, alg_id,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

/// The name both sides put in and expect of a certificate.
pub const SERVER_NAME: &str = "localhost";

/// The plugin's certificate and key, made at start.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// A new self-signed ECDSA P-256 certificate for `localhost`, valid for
    /// server and client authentication.
    pub fn generate() -> Result<Identity, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("cannot make a key: {e}"))?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| format!("cannot make a certificate: {e}"))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(30)).into();
        // As long as go-plugin's own: about thirty years.
        params.not_after = (now + std::time::Duration::from_secs(262_980 * 3600)).into();
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("cannot sign the certificate: {e}"))?;
        Ok(Identity {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The host's certificate from `PLUGIN_CLIENT_CERT` (PEM).
pub fn host_certificate(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("PLUGIN_CLIENT_CERT holds no PEM certificate: {e}"))
}

/// ECDSA over P-521 with SHA-512, the signature of go-plugin's keys.
#[derive(Debug)]
struct EcdsaP521Sha512;

impl SignatureVerificationAlgorithm for EcdsaP521Sha512 {
    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_P521
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_SHA512
    }

    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        use p521::ecdsa::signature::Verifier as _;
        let key =
            p521::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| InvalidSignature)?;
        let sig = p521::ecdsa::Signature::from_der(signature).map_err(|_| InvalidSignature)?;
        key.verify(message, &sig).map_err(|_| InvalidSignature)
    }
}

static P521: EcdsaP521Sha512 = EcdsaP521Sha512;
static P521_ONLY: [&dyn SignatureVerificationAlgorithm; 1] = [&P521];

/// ring's algorithms plus ECDSA P-521 / SHA-512.
fn algorithms(ring: &CryptoProvider) -> WebPkiSupportedAlgorithms {
    let base = ring.signature_verification_algorithms;
    let mut all: Vec<&'static dyn SignatureVerificationAlgorithm> = base.all.to_vec();
    all.push(&P521);
    let mut mapping = base.mapping.to_vec();
    mapping.push((SignatureScheme::ECDSA_NISTP521_SHA512, &P521_ONLY));
    // Made once per process (one listener, one dialer).
    WebPkiSupportedAlgorithms {
        all: Vec::leak(all),
        mapping: Vec::leak(mapping),
    }
}

/// Accepts one certificate, byte for byte, and the handshake signatures
/// made with its key.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), Error> {
        if presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS settings of both directions: the plugin's listener (which
/// requires the host's certificate) and its connections to the host's
/// brokered services (which present the plugin's certificate and require
/// the host's). Both speak HTTP/2 only, by ALPN, as gRPC wants.
pub struct Mtls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl Mtls {
    pub fn new(me: &Identity, host: CertificateDer<'static>) -> Result<Mtls, String> {
        let ring = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = Arc::new(Pinned {
            cert: host,
            algorithms: algorithms(&ring),
        });
        let tls_err = |e: Error| format!("TLS setup: {e}");
        let mut server = ServerConfig::builder_with_provider(ring.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_client_cert_verifier(pinned.clone())
            .with_single_cert(vec![me.cert.clone()], me.key())
            .map_err(tls_err)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(ring)
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(pinned)
            .with_client_auth_cert(vec![me.cert.clone()], me.key())
            .map_err(tls_err)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Mtls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_is_for_localhost_and_round_trips_through_pem() {
        let me = Identity::generate().unwrap();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &me.cert)
        );
        assert_eq!(host_certificate(&pem).unwrap(), me.cert);
        assert!(host_certificate("not a certificate").is_err());
    }

    #[test]
    fn only_the_pinned_certificate_passes() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let ring = rustls::crypto::ring::default_provider();
        let pinned = Pinned {
            cert: a.cert.clone(),
            algorithms: algorithms(&ring),
        };
        assert!(pinned.check(&a.cert).is_ok());
        assert!(pinned.check(&b.cert).is_err());
        assert!(
            ClientCertVerifier::supported_verify_schemes(&pinned)
                .contains(&SignatureScheme::ECDSA_NISTP521_SHA512)
        );
    }
}

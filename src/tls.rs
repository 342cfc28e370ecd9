//! TLS termination: loads the PEM certificate chain and key named in `[listener.tls]` into a
//! rustls server configuration that offers h2 and http/1.1 by ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// A loaded certificate and key, ready to accept handshakes.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server: Arc<ServerConfig>,
}

/// What went wrong, and with which of the two files (`"cert"` or `"key"`).
#[derive(Debug)]
pub struct TlsError {
    pub which: &'static str,
    pub message: String,
}

impl TlsConfig {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let chain = certificates(&cert)?;
        let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError {
            which: "key",
            message: format!("cannot read a PEM private key from {}: {e}", key.display()),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError {
                which: "cert",
                message: e.to_string(),
            })?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| TlsError {
                which: "key",
                message: format!("the key does not fit the certificate: {e}"),
            })?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            cert,
            key,
            server: Arc::new(server),
        })
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |detail: String| TlsError {
        which: "cert",
        message: format!(
            "cannot read a PEM certificate chain from {}: {detail}",
            path.display()
        ),
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if chain.is_empty() {
        return Err(fail("no CERTIFICATE block found".into()));
    }
    Ok(chain)
}

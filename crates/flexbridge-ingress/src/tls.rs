//! TLS on the webhook listener (rustls), with the certificate re-read when its files change:
//! a renewed certificate (cert-manager, certbot) is served without a restart, and a broken
//! renewal keeps the previous certificate.

use crate::config::ListenerTls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
use tokio_rustls::TlsAcceptor;

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds no PEM object of the kind needed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (key does not match, unsupported key type).
    #[error("the certificate and key cannot be used together: {0}")]
    Config(#[from] rustls::Error),
}

/// The listener's TLS configuration, replaced when the files change.
pub struct ReloadingTls {
    settings: ListenerTls,
    current: RwLock<TlsAcceptor>,
    /// Modification times the current configuration was built from.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("cert_file", &self.settings.cert_file)
            .finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn acceptor(settings: &ListenerTls) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.cert_file)
        .map_err(|e| file_error(&settings.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&settings.cert_file, e))?;
    if certs.is_empty() {
        return Err(file_error(&settings.cert_file, "no PEM certificate in it"));
    }
    // The key's own error text never includes key material.
    let key = PrivateKeyDer::from_pem_file(&settings.key_file)
        .map_err(|e| file_error(&settings.key_file, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl ReloadingTls {
    /// Loads the certificate and key; an error here stops the start-up.
    pub fn load(settings: &ListenerTls) -> Result<Self, TlsError> {
        let times = (modified(&settings.cert_file), modified(&settings.key_file));
        Ok(Self {
            current: RwLock::new(acceptor(settings)?),
            settings: settings.clone(),
            loaded: Mutex::new(times),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How often [`ReloadingTls::reload_if_changed`] should run.
    pub fn reload_interval(&self) -> std::time::Duration {
        self.settings.reload_interval
    }

    /// Re-reads the files if either changed. A pair that does not load keeps the previous
    /// one in service (and is tried again at the next change). Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let times = (
            modified(&self.settings.cert_file),
            modified(&self.settings.key_file),
        );
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *loaded == times {
            return Ok(false);
        }
        *loaded = times;
        let fresh = acceptor(&self.settings)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(true)
    }
}

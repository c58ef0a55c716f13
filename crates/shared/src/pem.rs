//! PEM files named in configuration: checked at start so that an empty or
//! wrong file is a configuration error naming its field, not a failing
//! handshake later.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What a PEM file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pem {
    /// At least one certificate.
    Certificates,
    /// A private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reads `path` and checks it holds what `kind` needs; the error says why
/// (missing, unreadable, or no such PEM block).
pub fn check_pem(path: &Path, kind: Pem) -> Result<(), String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("file {} does not exist", path.display()));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let ok = match kind {
        Pem::Certificates => {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
            certs.is_ok_and(|c| !c.is_empty())
        }
        Pem::PrivateKey => PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} holds no PEM {}",
            path.display(),
            match kind {
                Pem::Certificates => "certificate",
                Pem::PrivateKey => "private key",
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_empty_and_wrong_files_are_named() {
        let dir = std::env::temp_dir().join(format!("sentinel-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope.pem");
        assert!(
            check_pem(&missing, Pem::Certificates)
                .unwrap_err()
                .contains("does not exist")
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(
            check_pem(&empty, Pem::Certificates)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(
            check_pem(&empty, Pem::PrivateKey)
                .unwrap_err()
                .contains("no PEM private key")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

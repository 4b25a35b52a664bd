//! Secrets (the auth secret, LLM API keys) come from the environment or from a file only
//! its owner can read, never from a command-line argument: every local user can read a
//! process's arguments (`ps`, /proc/PID/cmdline), and shells keep them in their history.

use std::path::Path;

use thiserror::Error;

/// Why a secret file cannot be used.
#[derive(Debug, Error)]
pub enum SecretError {
    /// It cannot be read.
    #[error("cannot read the secret file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Others than its owner may read it.
    #[error("the secret file {path} can be read by others (mode {mode:o}); make it the owner's only: chmod 600 {path}")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// It holds nothing but whitespace.
    #[error("the secret file {path} is empty")]
    Empty {
        /// The file.
        path: String,
    },
}

/// The secret in `path` (surrounding whitespace, such as a final newline, removed), if
/// the file is neither group- nor world-accessible.
pub fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    let name = path.display().to_string();
    let metadata = std::fs::metadata(path).map_err(|source| SecretError::Read { path: name.clone(), source })?;
    if let Some(mode) = exposed_mode(&metadata) {
        return Err(SecretError::Exposed { path: name, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read { path: name.clone(), source })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretError::Empty { path: name });
    }
    Ok(secret.to_owned())
}

/// The secret from `file` if one is named, else from the environment variable `var`.
pub fn secret_from(var: &str, file: Option<&Path>) -> Result<Option<String>, SecretError> {
    match file {
        Some(path) => read_secret_file(path).map(Some),
        None => Ok(std::env::var(var).ok().filter(|value| !value.is_empty())),
    }
}

/// The file's permission bits, if its group or others may access it (a secret must be
/// its owner's alone).
pub fn exposed_mode(metadata: &std::fs::Metadata) -> Option<u32> {
    Some(permission_bits(metadata)).filter(|mode| mode & 0o077 != 0)
}

#[cfg(unix)]
fn permission_bits(metadata: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    metadata.permissions().mode() & 0o777
}

#[cfg(not(unix))]
fn permission_bits(_metadata: &std::fs::Metadata) -> u32 {
    0o600
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_secret_file_is_read_only_when_its_owner_alone_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "s3cret");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read_secret_file(&path).unwrap_err();
        assert!(matches!(refused, SecretError::Exposed { mode: 0o644, .. }), "{refused}");
        assert!(refused.to_string().contains("chmod 600"), "{refused}");

        std::fs::write(&path, "  \n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(matches!(read_secret_file(&path), Err(SecretError::Empty { .. })));
        assert!(matches!(read_secret_file(&dir.path().join("missing")), Err(SecretError::Read { .. })));
    }
}

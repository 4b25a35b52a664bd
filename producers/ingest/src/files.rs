//! The documents behind command-line paths: files as given, folders walked recursively
//! (hidden entries skipped), in a stable order.

use std::path::{Path, PathBuf};

/// Extensions read from folders; files named explicitly are read whatever their name.
const TEXT_EXTENSIONS: &[&str] = &["txt", "md", "markdown", "text", "rst", "csv", "json", "log"];

/// Every file to ingest under `paths`, sorted, each once.
pub fn collect(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk(path, &mut files)?;
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{}: no such file", path.display())));
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, files)?;
        } else if path
            .extension()
            .is_some_and(|e| TEXT_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
        {
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_walked_for_text_files_and_hidden_entries_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        for name in ["b.md", "sub/a.txt", "image.png", ".git/c.txt", ".hidden.md"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let files = collect(&[dir.path().to_path_buf(), dir.path().join("b.md")]).unwrap();
        let names: Vec<_> =
            files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["b.md", "sub/a.txt"]);
        assert!(collect(&[dir.path().join("missing.md")]).unwrap_err().to_string().contains("missing.md"));
    }
}

//! Files the host puts into the guest (a task's repository archive; later, secrets): written
//! part by part at the offsets the host gives (so a part sent twice does no harm), checked
//! against the whole file's SHA-256 on the final part, and unpacked when it is a tar
//! archive. Only absolute paths without `..` are accepted.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Component, Path};

use base64::Engine;
use sha2::{Digest, Sha256};

/// Writes one part; on the final part (`sha256` given) verifies and unpacks. `Ok(true)`
/// when the file is complete.
pub fn put(
    path: &str,
    offset: u64,
    data: &str,
    sha256: Option<&str>,
    unpack_into: Option<&str>,
) -> Result<bool, String> {
    let path = checked(path)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("{}: the data is not base64: {e}", path.display()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(&bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(expected) = sha256 else {
        return Ok(false);
    };
    drop(file);
    let written = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let actual = format!("{:x}", Sha256::digest(&written));
    if actual != expected {
        return Err(format!(
            "{}: incomplete or damaged (sha256 {actual}, expected {expected})",
            path.display()
        ));
    }
    if let Some(dir) = unpack_into {
        let dir = checked(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // tar's unpack refuses entries that would land outside `dir`.
        tar::Archive::new(written.as_slice())
            .unpack(dir)
            .map_err(|e| format!("unpacking {} into {}: {e}", path.display(), dir.display()))?;
    }
    Ok(true)
}

fn checked(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    let fine = p.is_absolute() && p.components().all(|c| !matches!(c, Component::ParentDir));
    if fine {
        Ok(p)
    } else {
        Err(format!(
            "{path:?}: only absolute paths without .. are accepted"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn parts_are_written_at_their_offsets_verified_and_unpacked() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut archive = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(6);
        header.set_mode(0o644);
        header.set_cksum();
        archive
            .append_data(&mut header, "src/README", &b"hello\n"[..])
            .expect("append");
        let bytes = archive.into_inner().expect("tar");
        let sha = format!("{:x}", Sha256::digest(&bytes));
        let file = dir.join("repo.tar").display().to_string();
        let work = dir.join("work").display().to_string();
        let (a, b) = bytes.split_at(700);
        assert_eq!(put(&file, 0, &b64(a), None, None), Ok(false));
        // A part sent twice is harmless.
        assert_eq!(put(&file, 0, &b64(a), None, None), Ok(false));
        assert_eq!(put(&file, 700, &b64(b), Some(&sha), Some(&work)), Ok(true));
        assert_eq!(
            std::fs::read_to_string(dir.join("work/src/README")).expect("unpacked"),
            "hello\n"
        );
        let damaged = put(&file, 0, &b64(a), Some(&sha), None).expect_err("damaged");
        assert!(damaged.contains("incomplete or damaged"), "{damaged}");
        assert!(put("relative/x", 0, "", None, None).is_err());
        assert!(put("/run/../etc/x", 0, "", None, None).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

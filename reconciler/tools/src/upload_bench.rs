//! Shipping an image to a host (`--upload`, needs libvirtd): the first use of a base disk
//! of `--upload-mib` MiB of data on a provider, as a create does it (the file's sha256, a
//! volume in the fleet's pool, the upload, the file found unchanged, the marker), next to
//! `virsh vol-upload` of the same file into the same pool. Prints both throughputs and the
//! ratio (goal ≤ 1.5). Uses a pool and a fleet name of its own, removed on every path.

use std::path::Path;
use std::time::{Duration, Instant};

use fleet::driver::libvirt::LibvirtDriver;
use fleet::driver::libvirt::volumes::ImageFile;
use fleet::spec::{DomainType, HostPath, LibvirtProvider, Name};

/// The pool the bench's driver defines, destroyed and undefined when dropped.
struct BenchPool(String);

impl Drop for BenchPool {
    fn drop(&mut self) {
        for args in [["pool-destroy", &self.0], ["pool-undefine", &self.0]] {
            let _ = std::process::Command::new("virsh")
                .args(["-c", "qemu:///system"])
                .args(args)
                .output();
        }
    }
}

fn virsh(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A qcow2 base disk holding `mib` MiB of data that does not compress.
fn base_disk(dir: &Path, mib: usize) -> anyhow::Result<std::path::PathBuf> {
    let raw = dir.join("base.raw");
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut bytes = Vec::with_capacity(mib << 20);
    while bytes.len() < mib << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::write(&raw, bytes)?;
    let disk = dir.join("base.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&raw)?;
    Ok(disk)
}

pub fn bench_upload(mib: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("fleet-bench-upload-")
        .tempdir()?;
    // QEMU's and libvirtd's side only needs the pool's directory; the image root is fleet's.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images)?;
    let disk = base_disk(&images, mib)?;
    let size = std::fs::metadata(&disk)?.len();
    let fleet = format!("benchupload{}", std::process::id());
    let provider = LibvirtProvider {
        name: Name("local".into()),
        uri: "qemu:///system".into(),
        storage_dir: Some(HostPath(
            dir.path().join("storage").to_string_lossy().into_owned(),
        )),
        storage_pool: None,
        full_network: None,
    };
    let _pool = BenchPool(format!("fleet-{fleet}"));
    let driver = LibvirtDriver::new(&fleet, &provider, DomainType::Qemu, &images);

    // The plan reads the file's sha256 before apply ships it (`image_content`): timed
    // apart, then the ship (which finds it cached).
    let started = Instant::now();
    anyhow::ensure!(
        fleet::image_content::file_digest(&disk).is_some(),
        "no digest"
    );
    let digest_time = started.elapsed();
    let started = Instant::now();
    let shipped = driver.ship("bench", ImageFile::Disk, &disk)?;
    let fleet_time = started.elapsed();
    anyhow::ensure!(
        std::fs::metadata(&shipped)?.len() == size,
        "the shipped volume is not the file's size"
    );

    let pool = format!("fleet-{fleet}");
    let started = Instant::now();
    virsh(&[
        "vol-create-as",
        &pool,
        "plain.raw",
        &size.to_string(),
        "--format",
        "raw",
    ])?;
    virsh(&[
        "vol-upload",
        "plain.raw",
        &disk.to_string_lossy(),
        "--pool",
        &pool,
    ])?;
    let plain_time = started.elapsed();
    virsh(&["vol-delete", "plain.raw", "--pool", &pool])?;
    // fleet's volumes go as a tidy would take them (its pool is removed with the bench's).
    for entry in std::fs::read_dir(dir.path().join("storage").join(&fleet).join(".volumes"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let _ = virsh(&["vol-delete", &name, "--pool", &pool]);
    }

    let rate = |d: Duration| size as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "upload: first use of a {:.0} MiB base disk on a provider: fleet ships it in {:.2} s ({:.0} MiB/s: volume, upload, file version checked, marker; the plan's sha256 of the file took {:.2} s more) next to {:.2} s for virsh vol-upload of the same file ({:.0} MiB/s); ratio {:.2} (goal <= 1.5)",
        size as f64 / (1 << 20) as f64,
        fleet_time.as_secs_f64(),
        rate(fleet_time),
        digest_time.as_secs_f64(),
        plain_time.as_secs_f64(),
        rate(plain_time),
        fleet_time.as_secs_f64() / plain_time.as_secs_f64()
    );
    Ok(())
}

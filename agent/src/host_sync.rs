//! What a guest takes from the host at CreateSandbox: the wall clock and
//! fresh randomness. A guest restored from a template wakes with the
//! template's clock and RNG state; every restored guest must have its own.

use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

/// Most host entropy taken at once (the kernel's input pool holds 256 bytes).
pub const MAX_ENTROPY_BYTES: usize = 512;

/// RNDADDENTROPY: `_IOW('R', 0x03, int[2])`, see linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// RNDRESEEDCRNG: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Sets CLOCK_REALTIME to `unix_nanos` (ns since the epoch).
pub fn set_wall_clock(unix_nanos: i64) -> Result<()> {
    if unix_nanos <= 0 {
        return Err(Error::InvalidArgument(format!(
            "wall clock {unix_nanos} ns is not a time after the epoch"
        )));
    }
    const NANOS: i64 = 1_000_000_000;
    let time = nix::sys::time::TimeSpec::new(unix_nanos / NANOS, unix_nanos % NANOS);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, time)
        .map_err(|e| Error::Internal(format!("set the wall clock: {e}")))
}

/// Mixes `entropy` into the kernel's input pool, credits it, and reseeds
/// the kernel's RNG from the pool at once (getrandom and
/// /proc/sys/kernel/random/uuid draw on the new state from then on).
pub fn reseed(entropy: &[u8]) -> Result<()> {
    if entropy.is_empty() || entropy.len() > MAX_ENTROPY_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{} bytes of entropy (1 to {MAX_ENTROPY_BYTES})",
            entropy.len()
        )));
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| Error::Internal(format!("open /dev/urandom: {e}")))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let len = i32::try_from(entropy.len()).unwrap_or(i32::MAX);
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes
    // that follow its header; the kernel only reads it.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(Error::Internal(format!(
            "add host entropy: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(Error::Internal(format!(
            "reseed the RNG: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_inputs_are_refused_before_anything_changes() {
        assert!(set_wall_clock(0).is_err());
        assert!(set_wall_clock(-5).is_err());
        assert!(reseed(&[]).is_err());
        assert!(reseed(&[0; MAX_ENTROPY_BYTES + 1]).is_err());
    }
}

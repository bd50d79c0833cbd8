//! Time bases: kernel event stamps (CLOCK_MONOTONIC nanoseconds) to wall-clock
//! time, and kernel jiffies (TCP's idle stamps) to durations.

use std::{
    fs,
    io::Read,
    time::{Duration, SystemTime},
};

use nix::time::{ClockId, clock_gettime};

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error(
        "cannot tell the kernel's tick rate (CONFIG_HZ): no /proc/config.gz, no \
         /boot/config-<release>, and /proc/timer_list is unreadable; pass --hz"
    )]
    UnknownHz,
}

/// Converts CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Realtime minus monotonic, in nanoseconds, at the last `refresh`.
    offset_ns: i128,
}

impl WallClock {
    pub fn new() -> Self {
        let mut clock = Self { offset_ns: 0 };
        clock.refresh();
        clock
    }

    /// Re-reads both clocks, following NTP steps of the wall clock.
    pub fn refresh(&mut self) {
        let realtime = timespec_ns(ClockId::CLOCK_REALTIME);
        let monotonic = timespec_ns(ClockId::CLOCK_MONOTONIC);
        self.offset_ns = realtime - monotonic;
    }

    pub fn to_wall(&self, monotonic_ns: u64) -> SystemTime {
        let wall_ns = monotonic_ns as i128 + self.offset_ns;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(wall_ns.max(0) as u64)
    }

    /// CLOCK_MONOTONIC now, in the kernel's event time base.
    pub fn monotonic_now_ns() -> u64 {
        timespec_ns(ClockId::CLOCK_MONOTONIC) as u64
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

fn timespec_ns(clock: ClockId) -> i128 {
    let ts = clock_gettime(clock).expect("clock_gettime on a standard clock");
    ts.tv_sec() as i128 * 1_000_000_000 + ts.tv_nsec() as i128
}

/// The kernel's jiffy length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jiffies {
    pub hz: u32,
}

impl Jiffies {
    pub fn to_duration(self, jiffies: u32) -> Duration {
        Duration::from_nanos(jiffies as u64 * 1_000_000_000 / self.hz as u64)
    }

    /// The fewest jiffies that last at least `duration`.
    pub fn ceil_from(self, duration: Duration) -> u32 {
        let jiffy_ns = 1_000_000_000 / self.hz as u128;
        duration.as_nanos().div_ceil(jiffy_ns).min(u32::MAX as u128) as u32
    }

    /// The running kernel's CONFIG_HZ: from its build configuration when it is
    /// published, otherwise measured from /proc/timer_list over 100 ms.
    pub fn detect() -> Result<Self, ClockError> {
        hz_from_config()
            .or_else(hz_from_timer_list)
            .map(|hz| Self { hz })
            .ok_or(ClockError::UnknownHz)
    }
}

fn hz_from_config() -> Option<u32> {
    let mut text = String::new();
    let from_proc = fs::File::open("/proc/config.gz").ok().and_then(|file| {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .ok()
    });
    if from_proc.is_none() {
        let release = nix::sys::utsname::uname().ok()?;
        let path = format!("/boot/config-{}", release.release().to_string_lossy());
        fs::File::open(path).ok()?.read_to_string(&mut text).ok()?;
    }
    parse_config_hz(&text)
}

fn parse_config_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|value| value.trim().parse().ok())
}

/// Samples `jiffies:` and `now at` from /proc/timer_list twice and rounds the rate
/// to the nearest rate a kernel can be configured with.
fn hz_from_timer_list() -> Option<u32> {
    let sample = || -> Option<(u64, u64)> {
        let text = fs::read_to_string("/proc/timer_list").ok()?;
        parse_timer_list(&text)
    };
    let (now1, jiffies1) = sample()?;
    std::thread::sleep(Duration::from_millis(100));
    let (now2, jiffies2) = sample()?;
    let elapsed = now2.checked_sub(now1)? as f64 / 1e9;
    let rate = jiffies2.wrapping_sub(jiffies1) as f64 / elapsed;
    [100u32, 250, 300, 1000].into_iter().min_by(|a, b| {
        (*a as f64 - rate)
            .abs()
            .total_cmp(&(*b as f64 - rate).abs())
    })
}

fn parse_timer_list(text: &str) -> Option<(u64, u64)> {
    let now = text.lines().find_map(|line| {
        line.strip_prefix("now at ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
    })?;
    let jiffies = text.lines().find_map(|line| {
        line.trim()
            .strip_prefix("jiffies:")
            .and_then(|value| value.trim().parse().ok())
    })?;
    Some((now, jiffies))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hz_line() {
        let config = "CONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_SCHED_HRTICK=y\n";
        assert_eq!(parse_config_hz(config), Some(250));
        assert_eq!(parse_config_hz("# CONFIG_HZ is not set\n"), None);
    }

    #[test]
    fn timer_list_sample() {
        let text = "Timer List Version: v0.10\nnow at 296665620770 nsecs\n\ncpu: 0\n  \
                    .idle_jiffies   : 4294966424\njiffies: 4294966428\n";
        assert_eq!(parse_timer_list(text), Some((296665620770, 4294966428)));
    }

    #[test]
    fn jiffies_to_duration() {
        let jiffies = Jiffies { hz: 250 };
        assert_eq!(jiffies.to_duration(75), Duration::from_millis(300));
        assert_eq!(
            Jiffies { hz: 1000 }.to_duration(1),
            Duration::from_millis(1)
        );
        assert_eq!(jiffies.ceil_from(Duration::from_millis(250)), 63);
        assert_eq!(jiffies.ceil_from(Duration::from_millis(248)), 62);
    }

    #[test]
    fn detects_this_kernels_hz() {
        // The development and CI machines run HZ=250 (MISSION.md).
        assert_eq!(Jiffies::detect().unwrap().hz, 250);
    }

    #[test]
    fn wall_clock_maps_now_to_now() {
        let clock = WallClock::new();
        let wall = clock.to_wall(WallClock::monotonic_now_ns());
        let drift = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(drift < Duration::from_millis(50), "{drift:?}");
    }
}

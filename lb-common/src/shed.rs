//! Load shedding: a limit on new flows per second, per backend and per service, kept in the
//! data plane. One bucket per backend slot (`0..MAX_BACKENDS`) and per service id
//! (`MAX_BACKENDS + id`), shared by all CPUs: per-CPU buckets would split a limit by CPU, and
//! with RSS (or one busy queue) a backend would get a fraction of its rate. Only new flows touch
//! a bucket, so the shared cache line costs established flows nothing.

/// A fixed window counter: at most `limit` new flows per `window_ms`. The daemon sets
/// `limit` and `window_ms` (0 = no limit); the data plane keeps the window.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ShedBucket {
    pub limit: u32,
    pub window_ms: u32,
    /// Start of the current window (CLOCK_MONOTONIC ns).
    pub window_start: u64,
    /// New flows let through in it.
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<ShedBucket>() == 24);

impl ShedBucket {
    /// The bucket of `rate` new flows per second: windows of 100 ms (1 s below 10/s), so a
    /// burst is at most a tenth of a second's worth.
    pub const fn for_rate(rate: u32) -> Self {
        let (limit, window_ms) = if rate == 0 {
            (0, 0)
        } else if rate >= 10 {
            ((rate + 5) / 10, 100)
        } else {
            (rate, 1000)
        };
        Self {
            limit,
            window_ms,
            window_start: 0,
            count: 0,
        }
    }

    /// Whether the settings (not the running window) are the same.
    pub const fn same_limit(&self, other: &Self) -> bool {
        self.limit == other.limit && self.window_ms == other.window_ms
    }
}

/// Index of a service's bucket.
pub const fn service_bucket(id: u32) -> u32 {
    crate::maps::MAX_BACKENDS + id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_become_windows() {
        assert_eq!(ShedBucket::for_rate(200).limit, 20);
        assert_eq!(ShedBucket::for_rate(200).window_ms, 100);
        assert_eq!(ShedBucket::for_rate(5).limit, 5);
        assert_eq!(ShedBucket::for_rate(5).window_ms, 1000);
        assert_eq!(ShedBucket::for_rate(0).limit, 0);
    }
}

//! Which replica owns a task when tasks are sharded (`--shard.index` / `--shard.count`).
//!
//! The shard of a task is `jump_hash(fnv1a64(provider + "\0" + task_id), count)`: FNV-1a
//! (64-bit) for a stable key hash that any language can reproduce, and Lamping & Veach's
//! jump consistent hash, which moves only about 1/N of the tasks when the count goes from
//! N-1 to N. Both are fixed forever: changing them would move every task.

use crate::config::Shard;

/// FNV-1a, 64-bit.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Jump consistent hash: a bucket in `0..buckets` for `key`.
pub(crate) fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b.wrapping_add(1) as f64)
            * ((1u64 << 31) as f64 / ((key >> 33).wrapping_add(1) as f64))) as i64;
    }
    b as u32
}

/// The shard owning `task_id` of `provider` among `count` shards.
pub fn shard_of(provider: &str, task_id: &str, count: u32) -> u32 {
    let mut key = Vec::with_capacity(provider.len() + 1 + task_id.len());
    key.extend_from_slice(provider.as_bytes());
    key.push(0);
    key.extend_from_slice(task_id.as_bytes());
    jump_hash(fnv1a64(&key), count)
}

impl Shard {
    /// Whether this shard owns `provider`/`id`.
    pub(crate) fn owns(&self, provider: &str, id: &str) -> bool {
        self.count <= 1 || shard_of(provider, id, self.count) == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn jump_hash_is_balanced_and_moves_little() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("task-{i}")).collect();
        let mut per_shard = [0u32; 3];
        for id in &ids {
            per_shard[shard_of("mx", id, 3) as usize] += 1;
        }
        for n in per_shard {
            assert!((3_000..3_700).contains(&n), "{per_shard:?}");
        }
        let moved = ids
            .iter()
            .filter(|id| shard_of("mx", id, 3) != shard_of("mx", id, 4))
            .count();
        // About a quarter move from 3 to 4 shards, and only to the new shard.
        assert!((2_000..3_000).contains(&moved), "{moved}");
        assert!(
            ids.iter()
                .filter(|id| shard_of("mx", id, 3) != shard_of("mx", id, 4))
                .all(|id| shard_of("mx", id, 4) == 3)
        );
        assert_eq!(shard_of("mx", "x", 1), 0);
    }
}

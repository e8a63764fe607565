//! New GUIDs. Normally random (v4). With `VHDMERGE_GUID_SEED=<n>` (or
//! [`set_seed`]) they come from a seeded sequence instead, so that two runs
//! of the same merge write byte-identical files: the crash tests compare a
//! recovered merge with an uninterrupted one byte for byte.

use std::sync::Mutex;

use uuid::Uuid;

static STATE: Mutex<Option<u64>> = Mutex::new(None);

/// Makes this process's GUIDs repeatable from `seed`, or random again with `None`.
pub fn set_seed(seed: Option<u64>) {
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = seed;
}

pub fn fresh() -> Uuid {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if st.is_none() {
        match std::env::var("VHDMERGE_GUID_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(seed) => *st = Some(seed),
            None => return Uuid::new_v4(),
        }
    }
    let x = st.as_mut().expect("seeded above");
    let hi = splitmix64(x);
    let bytes = (u128::from(hi) << 64 | u128::from(splitmix64(x))).to_le_bytes();
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The next value of a splitmix64 sequence (Steele, Lea and Flood 2014):
/// seeded GUIDs here, test patterns in the tests.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

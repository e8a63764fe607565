//! Output of the commands that have more to show than a line or two.

pub mod scan;

/// A byte count in IEC units ("1.5 GiB", "512 B").
pub fn iec(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn iec_units() {
        assert_eq!(super::iec(0), "0 B");
        assert_eq!(super::iec(1023), "1023 B");
        assert_eq!(super::iec(1024), "1 KiB");
        assert_eq!(super::iec(1536 << 20), "1.5 GiB");
        assert_eq!(super::iec(8 << 30), "8 GiB");
        assert_eq!(super::iec(200 << 20), "200 MiB");
    }
}

//! The few `/proc` figures mezod reads: memory fields written as "N kB".

/// Field `name` (e.g. `VmHWM`) of a `/proc` file such as `/proc/self/status`
/// or `/proc/meminfo`, in bytes; 0 when the file or field is missing.
pub fn kb_field(file: &str, name: &str) -> u64 {
    kb_field_in(&std::fs::read_to_string(file).unwrap_or_default(), name)
}

/// Field `name` of such a file's text already read, in bytes; 0 when missing.
pub(crate) fn kb_field_in(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_fields_of_this_process_and_the_machine() {
        let rss = kb_field("/proc/self/status", "VmRSS");
        assert!(rss > 0 && kb_field("/proc/self/status", "VmHWM") >= rss);
        assert!(kb_field("/proc/meminfo", "MemTotal") >= kb_field("/proc/meminfo", "MemAvailable"));
        assert_eq!(kb_field("/proc/self/status", "NoSuchField"), 0);
        assert_eq!(kb_field("/proc/no-such-file", "VmRSS"), 0);
    }
}

//! Attacker-controlled text (paths, claimed ids, user agents, forwarding headers) kept to a bound
//! wherever it is recorded.

/// Attacker-controlled text is cut to this many bytes.
pub const MAX_TEXT: usize = 256;

/// Cuts attacker-controlled text to at most [`MAX_TEXT`] bytes on a character boundary.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

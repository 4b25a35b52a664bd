//! Browser-origin checks (pure). A browser sends `Origin` with a WebSocket upgrade and with
//! every state-changing request; a page on another site must not open a socket or change
//! anything with a user's credentials. Requests without `Origin` are not a browser's
//! cross-site requests (the CLI, tests, other services) and pass.

/// Whether a request from `origin` to `host` (its `Host` header) may go on: the same
/// origin as the gateway's own pages, or one on `allowed` (`*`: any).
pub fn allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.iter().any(|entry| entry == "*" || entry.eq_ignore_ascii_case(origin)) {
        return true;
    }
    // `null` (a sandboxed frame, a file) has no host and never matches.
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    origin_host.zip(host).is_some_and(|(origin_host, host)| origin_host.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_own_origin_and_listed_ones_pass_others_do_not() {
        let none: Vec<String> = Vec::new();
        let host = Some("chat.example.com:8080");
        assert!(allowed(None, host, &none), "not a browser");
        assert!(allowed(Some("http://chat.example.com:8080"), host, &none), "the chat page itself");
        assert!(allowed(Some("https://CHAT.example.com:8080"), host, &none));
        assert!(!allowed(Some("https://evil.example"), host, &none));
        assert!(!allowed(Some("http://chat.example.com:8081"), host, &none), "another port is another origin");
        assert!(!allowed(Some("null"), host, &none));
        assert!(!allowed(Some("https://chat.example.com:8080"), None, &none), "no Host: nothing to compare");
        let listed = vec!["https://app.example.com".to_owned()];
        assert!(allowed(Some("https://app.example.com"), host, &listed));
        assert!(!allowed(Some("https://app.example.com.evil.example"), host, &listed));
        assert!(allowed(Some("https://anything.example"), host, &["*".to_owned()]));
    }
}

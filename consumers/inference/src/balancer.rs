//! Choosing an LLM endpoint for each call, as plain state with time passed in: least
//! outstanding requests among the endpoints whose circuit breaker lets calls through,
//! preferring one with a free slot and one this turn has not failed on yet.

use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::retry::CircuitBreaker;

/// One OpenAI-compatible endpoint of the pool, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Base URL up to and including /v1.
    pub base_url: String,
    /// Model name sent to it (None: the pool's default).
    pub model: Option<String>,
    /// Environment variable holding its API key (None: the pool's default key).
    pub api_key_env: Option<String>,
    /// Generations it serves at once (llama.cpp's `--parallel`).
    pub slots: u32,
}

impl FromStr for EndpointSpec {
    type Err = String;

    /// `URL[;model=NAME][;slots=N][;api_key_env=VAR]`.
    fn from_str(value: &str) -> Result<Self, String> {
        let mut parts = value.split(';');
        let base_url = parts.next().unwrap_or_default().trim().trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(format!("{value:?}: an endpoint starts with its http(s) base URL, e.g. http://host:8080/v1"));
        }
        let mut spec = Self { base_url, model: None, api_key_env: None, slots: 4 };
        for part in parts {
            match part.split_once('=') {
                Some(("model", model)) if !model.is_empty() => spec.model = Some(model.to_owned()),
                Some(("api_key_env", var)) if !var.is_empty() => spec.api_key_env = Some(var.to_owned()),
                Some(("slots", slots)) => {
                    spec.slots = slots
                        .parse()
                        .ok()
                        .filter(|s| (1..=1024).contains(s))
                        .ok_or_else(|| format!("{value:?}: slots must be 1 to 1024"))?;
                }
                _ => return Err(format!("{value:?}: unknown part {part:?} (model=, slots=, api_key_env=)")),
            }
        }
        Ok(spec)
    }
}

/// The live state of the pool's endpoints.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<EndpointState>,
}

#[derive(Debug)]
struct EndpointState {
    slots: u32,
    outstanding: u32,
    breaker: CircuitBreaker,
}

impl Balancer {
    /// `slots` per endpoint, each with its own breaker.
    pub fn new(slots: impl IntoIterator<Item = u32>, breaker_threshold: u32, breaker_cool_down: Duration) -> Self {
        let endpoints = slots
            .into_iter()
            .map(|slots| EndpointState {
                slots,
                outstanding: 0,
                breaker: CircuitBreaker::new(breaker_threshold, breaker_cool_down),
            })
            .collect();
        Self { endpoints }
    }

    /// The endpoint for the next call, counted as outstanding until [`Balancer::finish`];
    /// None when every breaker is open. Endpoints in `avoid` (failed this turn) are taken
    /// only when no other one can be.
    pub fn pick(&mut self, now: Instant, avoid: &[usize]) -> Option<usize> {
        let key = |(index, endpoint): &(usize, &EndpointState)| {
            (
                avoid.contains(index),
                endpoint.outstanding >= endpoint.slots,
                // Least outstanding, relative to capacity (integer cross-multiplication).
                u64::from(endpoint.outstanding) * 1024 / u64::from(endpoint.slots.max(1)),
                *index,
            )
        };
        let chosen =
            self.endpoints.iter().enumerate().filter(|(_, e)| e.breaker.allows(now)).min_by_key(key).map(|(i, _)| i)?;
        self.endpoints[chosen].outstanding += 1;
        Some(chosen)
    }

    /// A call on `endpoint` ended: `healthy` false for a failure that says something
    /// about the endpoint (not a rejected request).
    pub fn finish(&mut self, endpoint: usize, healthy: bool, now: Instant) {
        let Some(state) = self.endpoints.get_mut(endpoint) else { return };
        state.outstanding = state.outstanding.saturating_sub(1);
        if healthy {
            state.breaker.record_success();
        } else {
            state.breaker.record_failure(now);
        }
    }

    /// Endpoints whose breaker is open now: the health probe checks them.
    pub fn open(&self, now: Instant) -> Vec<usize> {
        (0..self.endpoints.len()).filter(|i| !self.endpoints[*i].breaker.allows(now)).collect()
    }

    /// The probe found `endpoint` answering: it takes calls again.
    pub fn healed(&mut self, endpoint: usize) {
        if let Some(state) = self.endpoints.get_mut(endpoint) {
            state.breaker.record_success();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_specs_parse_with_their_options() {
        let spec: EndpointSpec = "http://127.0.0.1:18080/v1/;model=m;slots=8;api_key_env=KEY".parse().unwrap();
        assert_eq!(spec.base_url, "http://127.0.0.1:18080/v1");
        assert_eq!((spec.model.as_deref(), spec.slots, spec.api_key_env.as_deref()), (Some("m"), 8, Some("KEY")));
        assert_eq!("https://api.example/v1".parse::<EndpointSpec>().unwrap().slots, 4);
        for bad in ["127.0.0.1:1/v1", "http://h/v1;slots=0", "http://h/v1;color=red", "http://h/v1;key=secret"] {
            assert!(bad.parse::<EndpointSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn calls_go_to_the_least_loaded_endpoint_with_a_free_slot() {
        let now = Instant::now();
        let mut pool = Balancer::new([2, 1], 3, Duration::from_secs(10));
        assert_eq!(pool.pick(now, &[]), Some(0));
        assert_eq!(pool.pick(now, &[]), Some(1), "endpoint 0 is half busy, 1 is idle");
        assert_eq!(pool.pick(now, &[]), Some(0), "0 has a free slot left, 1 has none");
        assert_eq!(pool.pick(now, &[]), Some(0), "all slots busy: the least loaded relative to its slots");
        pool.finish(1, true, now);
        assert_eq!(pool.pick(now, &[]), Some(1));
    }

    #[test]
    fn a_failed_endpoint_is_avoided_for_the_retry_and_taken_out_when_broken() {
        let now = Instant::now();
        let mut pool = Balancer::new([4, 4], 2, Duration::from_secs(10));
        let first = pool.pick(now, &[]).unwrap();
        pool.finish(first, false, now);
        let retry = pool.pick(now, &[first]).unwrap();
        assert_ne!(retry, first, "the retry goes elsewhere");
        pool.finish(retry, true, now);
        let again = pool.pick(now, &[retry]).unwrap();
        assert_eq!(again, first);
        pool.finish(again, false, now);
        assert_eq!(pool.open(now), [first], "two failures in a row open its breaker");
        for _ in 0..3 {
            let picked = pool.pick(now, &[]).unwrap();
            assert_ne!(picked, first, "an open endpoint takes no calls");
            pool.finish(picked, true, now);
        }
        pool.healed(first);
        assert!(pool.open(now).is_empty());
        let mut single = Balancer::new([1], 1, Duration::from_secs(10));
        let only = single.pick(now, &[]).unwrap();
        single.finish(only, false, now);
        assert_eq!(single.pick(now, &[]), None, "every breaker open: no endpoint");
        assert_eq!(single.pick(now + Duration::from_secs(10), &[]), Some(0), "half-open after the cool-down");
    }
}

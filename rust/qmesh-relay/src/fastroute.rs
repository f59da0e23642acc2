//! The HTTP engine's fast path: routes Python decided, reused for the
//! requests that would be decided the same way, so that such a request is
//! relayed without a trip through Python. Python books it afterwards, from
//! the engine's report ([`crate::http::HttpEvent::FastDone`]).
//!
//! A route is keyed by everything the decision rested on that the request
//! carries: the `Authorization` value (the app, whose key Python verified),
//! the path (the endpoint), the model asked for and whether it streams. It
//! holds for the request size it was decided for (a larger prompt or
//! `max_tokens` might be decided otherwise: it goes to Python), lives
//! `ttl` at most, and Python forgets every route whenever what decisions
//! rest on changes (a failure, a key revoked). A route is only a cache:
//! whatever it cannot serve, Python serves.
//!
//! Python keeps what it needs to book a route's requests until the engine
//! says it is released ([`Routes::released`]): forgotten or expired, and
//! with no request of its own in flight.
//!
//! A route is renewed before it expires: past its `refresh` time, one
//! request that fits it goes to Python, which decides it afresh and
//! installs a new route under the same key, while the others keep taking
//! the old one until then (or until it expires, if the new decision gives
//! no route). Without that, every request that arrived between the expiry
//! and the new route's install would have taken the slow way at once.

// Foldhash, not SipHash: a request's key is looked up on every request,
// and only routes Python installed are in the table, so a peer cannot
// fill it with keys that collide.
use foldhash::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::UpstreamTls;

/// What a request must carry to take a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteKey {
    pub authorization: Vec<u8>,
    pub path: String,
    pub model: String,
    pub stream: bool,
}

/// Where a route's requests go, and what of them Python decided.
#[derive(Debug)]
pub struct FastRoute {
    /// Python's name for it, in reports.
    pub id: u64,
    /// Who pays; requests of one app in flight on the fast path are capped.
    pub app: Arc<str>,
    pub max_in_flight: usize,
    pub addr: SocketAddr,
    /// TLS towards it (an https upstream).
    pub tls: Option<UpstreamTls>,
    /// The upstream request's line and headers, up to (without) its
    /// `content-length` and the blank line.
    pub request_head: Vec<u8>,
    /// The model's name at the upstream (the body is renamed when it differs).
    pub upstream_model: String,
    /// Added to the relayed answer's head.
    pub headers: Arc<[u8]>,
    pub first_byte_timeout: Duration,
    pub chunk_timeout: Duration,
    /// The largest body and `max_tokens` the decision holds for.
    pub max_body: usize,
    pub max_tokens: u64,
    /// From then on one request is sent to Python to renew it.
    pub refresh: Instant,
    pub expires: Instant,
}

#[derive(Default)]
pub struct Routes {
    live: HashMap<RouteKey, Arc<FastRoute>>,
    /// Requests in flight per route id, and per app.
    users: HashMap<u64, usize>,
    apps: HashMap<Arc<str>, usize>,
    /// Ids no longer live but with requests in flight.
    retired: HashSet<u64>,
    /// Ids to report released.
    released: Vec<u64>,
    /// Routes one of whose requests went to Python to renew them.
    renewing: HashSet<u64>,
}

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Install (or replace) the route for `key`.
    pub fn insert(&mut self, key: RouteKey, route: FastRoute) {
        let id = route.id;
        if let Some(old) = self.live.insert(key, Arc::new(route)) {
            if old.id != id {
                self.retire(old.id);
            }
        }
    }

    /// Forget every route (their requests in flight finish).
    pub fn clear(&mut self) {
        let ids: Vec<u64> = self.live.drain().map(|(_, r)| r.id).collect();
        for id in ids {
            self.retire(id);
        }
    }

    /// The route `key` may take now, counted as in flight until
    /// [`Routes::leave`]; None when there is none, it expired, the request
    /// is larger than it was decided for, or its app has as many requests
    /// in flight as it may.
    pub fn take(
        &mut self,
        key: &RouteKey,
        body: usize,
        max_tokens: u64,
        now: Instant,
    ) -> Option<Arc<FastRoute>> {
        let route = self.live.get(key)?;
        if route.expires <= now {
            let id = route.id;
            self.live.remove(key);
            self.retire(id);
            return None;
        }
        let busy = self.apps.get(&route.app).copied().unwrap_or(0);
        if body > route.max_body || max_tokens > route.max_tokens || busy >= route.max_in_flight {
            return None;
        }
        if route.refresh <= now && self.renewing.insert(route.id) {
            return None; // this one renews it
        }
        let route = Arc::clone(route);
        *self.users.entry(route.id).or_default() += 1;
        *self.apps.entry(Arc::clone(&route.app)).or_default() += 1;
        Some(route)
    }

    /// A request that took `route` is done with it.
    pub fn leave(&mut self, route: &FastRoute) {
        if let Some(n) = self.apps.get_mut(&route.app) {
            *n -= 1;
            if *n == 0 {
                self.apps.remove(&route.app);
            }
        }
        if let Some(n) = self.users.get_mut(&route.id) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&route.id);
                if self.retired.remove(&route.id) {
                    self.released.push(route.id);
                }
            }
        }
    }

    /// Forget the expired routes.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<RouteKey> = self
            .live
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(route) = self.live.remove(&key) {
                self.retire(route.id);
            }
        }
    }

    /// Requests of `app` in flight on the fast path.
    pub fn in_flight(&self, app: &str) -> usize {
        self.apps.get(app).copied().unwrap_or(0)
    }

    /// Ids released since the last call: Python may forget them.
    pub fn released(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.released)
    }

    /// `id` is no longer live (Python gives each route its own id, under
    /// one key): released once its last request is done.
    fn retire(&mut self, id: u64) {
        self.renewing.remove(&id);
        if self.users.contains_key(&id) {
            self.retired.insert(id);
        } else {
            self.released.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str) -> RouteKey {
        RouteKey {
            authorization: b"Bearer a:k".to_vec(),
            path: "/v1/chat/completions".into(),
            model: model.into(),
            stream: false,
        }
    }

    fn route(id: u64, expires: Instant) -> FastRoute {
        FastRoute {
            id,
            app: Arc::from("a"),
            max_in_flight: 2,
            addr: "127.0.0.1:1".parse().unwrap(),
            tls: None,
            request_head: Vec::new(),
            upstream_model: "m".into(),
            headers: Arc::from(&b""[..]),
            first_byte_timeout: Duration::from_secs(1),
            chunk_timeout: Duration::from_secs(1),
            max_body: 100,
            max_tokens: 50,
            refresh: expires,
            expires,
        }
    }

    #[test]
    fn a_route_holds_for_what_it_was_decided_for() {
        let now = Instant::now();
        let mut routes = Routes::default();
        routes.insert(key("m"), route(1, now + Duration::from_secs(1)));
        assert!(routes.take(&key("other"), 10, 10, now).is_none());
        assert!(routes.take(&key("m"), 101, 10, now).is_none());
        assert!(routes.take(&key("m"), 10, 51, now).is_none());
        let first = routes.take(&key("m"), 100, 50, now).unwrap();
        let second = routes.take(&key("m"), 1, 1, now).unwrap();
        assert!(routes.take(&key("m"), 1, 1, now).is_none(), "the app's cap");
        assert_eq!(routes.in_flight("a"), 2);
        routes.leave(&first);
        routes.leave(&second);
        assert_eq!(routes.in_flight("a"), 0);
        assert!(routes.released().is_empty());
    }

    #[test]
    fn one_request_renews_a_route_while_the_others_keep_taking_it() {
        let now = Instant::now();
        let mut routes = Routes::default();
        let mut old = route(1, now + Duration::from_secs(1));
        old.refresh = now + Duration::from_millis(750);
        routes.insert(key("m"), old);
        let early = routes.take(&key("m"), 1, 1, now).unwrap();
        routes.leave(&early);
        let late = now + Duration::from_millis(800);
        assert!(
            routes.take(&key("m"), 1, 1, late).is_none(),
            "the renewer goes to Python"
        );
        let other = routes.take(&key("m"), 1, 1, late).unwrap();
        assert_eq!(other.id, 1, "the others still take the old route");
        routes.leave(&other);
        // Python's new decision replaces it; the old one is released.
        let mut new = route(2, late + Duration::from_secs(1));
        new.refresh = late + Duration::from_millis(750);
        routes.insert(key("m"), new);
        assert_eq!(routes.released(), vec![1]);
        assert_eq!(routes.take(&key("m"), 1, 1, late).unwrap().id, 2);
        // No new decision: the old route serves until it expires, no longer.
        let mut lone = Routes::default();
        let mut only = route(3, now + Duration::from_secs(1));
        only.refresh = now;
        lone.insert(key("m"), only);
        assert!(lone.take(&key("m"), 1, 1, now).is_none());
        let kept = lone.take(&key("m"), 1, 1, now + Duration::from_millis(999));
        lone.leave(&kept.unwrap());
        assert!(lone
            .take(&key("m"), 1, 1, now + Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn a_route_is_released_once_forgotten_and_idle() {
        let now = Instant::now();
        let mut routes = Routes::default();
        routes.insert(key("m"), route(1, now + Duration::from_secs(1)));
        let busy = routes.take(&key("m"), 1, 1, now).unwrap();
        routes.clear();
        assert!(routes.take(&key("m"), 1, 1, now).is_none());
        assert!(routes.released().is_empty(), "a request still uses it");
        routes.leave(&busy);
        assert_eq!(routes.released(), vec![1]);

        routes.insert(key("m"), route(2, now + Duration::from_secs(1)));
        routes.insert(key("m"), route(3, now + Duration::from_secs(1)));
        assert_eq!(routes.released(), vec![2], "replaced");
        assert!(routes
            .take(&key("m"), 1, 1, now + Duration::from_secs(2))
            .is_none());
        assert_eq!(routes.released(), vec![3], "expired");
    }
}

//! Refusal of cross-site browser requests that change state: a web page in
//! an operator's browser must not create, delete or reload tasks on a bridge
//! it can reach (bodies are accepted whatever their content type, so a plain
//! HTML form could otherwise post one). A write is refused with 403 and the
//! envelope when the browser says it is cross-site or same-site
//! (`Sec-Fetch-Site`), or when its `Origin` is not the host it was sent to.
//! Requests without those headers (curl, BMW's own clients) pass; reads pass.
//!
//! A DNS-rebinding page passes that rule (its own name now points at the
//! bridge, so `Origin` and `Host` agree), and may read too: so a request
//! that a browser sent (it carries `Origin` or a `Sec-Fetch-*` header) must
//! name the bridge by an IP address, `localhost`, or a host the operator
//! allows (`--allowed-hosts`), whatever its method ([`rebinding_refusal`]).

use axum::extract::Request;
use axum::http::header::{HOST, ORIGIN};
use axum::http::uri::{Authority, Scheme};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::envelope::ApiError;

/// The 403 for a state-changing request a browser sent from another site;
/// `None` lets it through.
pub(crate) fn refusal(request: &Request) -> Option<Response> {
    if request.method().is_safe() {
        return None;
    }
    let reason = cross_site(request)?;
    Some(
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "forbidden: cross-site request refused ({reason}); a web page cannot change tasks"
            ),
        )
        .into_response(),
    )
}

/// The 403 for a browser's request naming the bridge by a host it does not
/// answer to (DNS rebinding); `None` lets it through.
pub(crate) fn rebinding_refusal(request: &Request, allowed: &[String]) -> Option<Response> {
    let headers = request.headers();
    let from_browser = headers.contains_key(ORIGIN)
        || headers
            .keys()
            .any(|name| name.as_str().starts_with("sec-fetch-"));
    if !from_browser {
        return None;
    }
    let host = target(request).map(|a| a.host().to_owned());
    match host {
        Some(host) if host_allowed(&host, allowed) => None,
        host => Some(
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "forbidden: a browser reached the bridge as {:?}, which it does not answer to \
                     (IP addresses and localhost do; add a name with --allowed-hosts)",
                    host.unwrap_or_default()
                ),
            )
            .into_response(),
        ),
    }
}

/// Whether a browser may name the bridge `host`: an IP address (a rebinding
/// needs a name), `localhost`, or an allowed name (`.domain`: any name under it).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if literal.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
        return true;
    }
    allowed.iter().any(|a| match a.strip_prefix('.') {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
        None => *a == host,
    })
}

/// Why `request` comes from another site, if it does.
fn cross_site(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = headers.get(ORIGIN)?;
    let origin_text = origin.to_str().unwrap_or("?");
    match (origin_text.parse::<Uri>(), target(request)) {
        (Ok(origin), Some(target)) if same_host_and_port(&origin, &target) => None,
        (_, Some(target)) => Some(format!("Origin {origin_text} is not http(s)://{target}")),
        (_, None) => Some(format!("Origin {origin_text} and no Host")),
    }
}

/// The host and port a request was sent to: its URI's authority, else its
/// `Host` header.
fn target(request: &Request) -> Option<Authority> {
    request
        .uri()
        .authority()
        .cloned()
        .or_else(|| request.headers().get(HOST)?.to_str().ok()?.parse().ok())
}

/// Whether `origin` (`scheme://host[:port]`) names the host and port of
/// `target` (a request's `Host`); a missing port is the scheme's default.
fn same_host_and_port(origin: &Uri, target: &Authority) -> bool {
    let Some(host) = origin.host() else {
        return false;
    };
    let default_port = match origin.scheme() {
        Some(s) if *s == Scheme::HTTP => 80,
        Some(s) if *s == Scheme::HTTPS => 443,
        _ => return false,
    };
    host.eq_ignore_ascii_case(target.host())
        && origin.port_u16().unwrap_or(default_port) == target.port_u16().unwrap_or(default_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::post("/bmw/task/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn a_browser_must_name_the_bridge_by_an_address_or_an_allowed_host() {
        let allowed = vec!["bmw.example.com".to_owned(), ".corp.example".to_owned()];
        let pass: &[&[(&str, &str)]] = &[
            // Not a browser: not checked.
            &[("Host", "evil.example:10211")],
            &[
                ("Host", "127.0.0.1:10211"),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            &[("Host", "[::1]:10211"), ("Origin", "http://[::1]:10211")],
            &[("Host", "localhost:10211"), ("Sec-Fetch-Mode", "cors")],
            &[
                ("Host", "BMW.example.com"),
                ("Origin", "http://bmw.example.com"),
            ],
            &[("Host", "a.corp.example:80"), ("Sec-Fetch-Site", "none")],
        ];
        for headers in pass {
            assert!(
                rebinding_refusal(&post(headers), &allowed).is_none(),
                "{headers:?}"
            );
        }
        let refused: &[&[(&str, &str)]] = &[
            &[
                ("Host", "evil.example:10211"),
                ("Origin", "http://evil.example:10211"),
            ],
            &[("Host", "evil.example"), ("Sec-Fetch-Site", "same-origin")],
            &[("Host", "corp.example"), ("Sec-Fetch-Site", "same-origin")],
            &[("Host", "xcorp.example"), ("Sec-Fetch-Site", "same-origin")],
            &[
                ("Host", "bmw.example.com.evil.example"),
                ("Sec-Fetch-Dest", "empty"),
            ],
            &[("Sec-Fetch-Site", "same-origin")],
        ];
        for headers in refused {
            assert!(
                rebinding_refusal(&post(headers), &allowed).is_some(),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn only_requests_from_another_site_are_cross_site() {
        let host = ("Host", "127.0.0.1:10211");
        let refused: &[&[(&str, &str)]] = &[
            &[host, ("Origin", "http://evil.example")],
            &[host, ("Origin", "http://127.0.0.1:10212")],
            &[host, ("Origin", "https://127.0.0.1")],
            &[host, ("Origin", "null")],
            &[host, ("Origin", "not a url")],
            &[("Origin", "http://127.0.0.1:10211")],
            &[host, ("Sec-Fetch-Site", "cross-site")],
            &[host, ("Sec-Fetch-Site", "same-site")],
        ];
        for headers in refused {
            assert!(cross_site(&post(headers)).is_some(), "{headers:?}");
        }
        let allowed: &[&[(&str, &str)]] = &[
            &[host],
            &[],
            &[host, ("Origin", "http://127.0.0.1:10211")],
            &[host, ("Origin", "HTTP://127.0.0.1:10211")],
            &[("Host", "bmw.example"), ("Origin", "http://BMW.example:80")],
            &[
                ("Host", "bmw.example:443"),
                ("Origin", "https://bmw.example"),
            ],
            &[host, ("Sec-Fetch-Site", "same-origin")],
            &[host, ("Sec-Fetch-Site", "none")],
        ];
        for headers in allowed {
            assert_eq!(cross_site(&post(headers)), None, "{headers:?}");
        }
    }
}

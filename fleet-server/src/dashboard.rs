//! The web dashboard: one static page (HTML, CSS and vanilla JS, no build
//! step, nothing from a CDN) served at `/` and `/dashboard`.
//!
//! The page holds no data and is served without auth. It reads the API
//! token from the URL fragment (`/dashboard#token=…` — a fragment never
//! reaches the server or its logs), keeps it in `sessionStorage` (gone when
//! the tab closes), and every 2 s asks the API, with the bearer token, for
//! devices, versions, rollouts and the drift view of each version in
//! service. An endpoint that fails (rollouts on a server without them)
//! shows as a note; the rest still renders.

/// The page.
pub const PAGE: &str = include_str!("dashboard/index.html");

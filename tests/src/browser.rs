//! A real browser for the pages the api serves (the ops dashboard, the playground): Debian's
//! headless Chromium driven through chromedriver with fantoccini, plus the few waits and the
//! full-page screenshot those tests share. `scripts/services.sh` installs Chromium and
//! chromedriver where they are missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long a page gets to show what a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);

/// A chromedriver child process with one headless Chromium session, in a fresh profile and
/// download directory that are deleted on close. Close the session with [`Browser::close`]; the
/// driver itself is killed when dropped.
pub struct Browser {
    pub client: Client,
    /// Where the browser saves downloads.
    pub downloads: PathBuf,
    profile: PathBuf,
    _driver: tokio::process::Child,
}

impl Browser {
    pub async fn start() -> Self {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: run scripts/services.sh (it installs chromium and chromium-driver)"
            );
        }
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let profile = std::env::temp_dir().join(format!("pictor-chromium-{unique}"));
        let downloads = profile.join("downloads");
        std::fs::create_dir_all(&downloads).expect("browser profile directory");

        let port = crate::harness::free_port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let webdriver = format!("http://127.0.0.1:{port}");
        wait_until_ready(&format!("{webdriver}/status")).await;

        // The flags keep Chromium from calling out to Google's services, which this machine's
        // closed network refuses, and give it an empty profile of its own.
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_string(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", profile.join("user-data").display()),
                    "--window-size=1280,1000",
                ],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                },
            }),
        );
        let client = ClientBuilder::rustls()
            .expect("rustls connector")
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .expect("chromium session starts");
        Self {
            client,
            profile,
            downloads,
            _driver: driver,
        }
    }

    pub async fn close(self) {
        let _ = self.client.clone().close().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }

    /// The element `css` selects, once it exists (for up to [`WAIT`]).
    pub async fn wait_for(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("{css} did not appear: {error}"))
    }

    /// Waits for the first element `css` selects and clicks it.
    pub async fn click(&self, css: &str) {
        self.wait_for(css)
            .await
            .click()
            .await
            .unwrap_or_else(|error| panic!("cannot click {css}: {error}"));
    }

    /// Waits for the file input `css` selects and attaches the file at `path` to it.
    pub async fn attach(&self, css: &str, path: &Path) {
        self.wait_for(css)
            .await
            .send_keys(&path.display().to_string())
            .await
            .unwrap_or_else(|error| panic!("cannot attach {} to {css}: {error}", path.display()));
    }

    pub async fn text(&self, css: &str) -> String {
        self.wait_for(css)
            .await
            .text()
            .await
            .unwrap_or_else(|error| panic!("text of {css}: {error}"))
    }

    pub async fn attr(&self, css: &str, name: &str) -> String {
        self.wait_for(css)
            .await
            .attr(name)
            .await
            .unwrap_or_else(|error| panic!("{name} of {css}: {error}"))
            .unwrap_or_else(|| panic!("{css} has no {name}"))
    }

    /// Polls an element's text until it contains `needle` (pages update asynchronously).
    pub async fn wait_for_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text(css).await;
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never said {needle:?}; last: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signs in on a page with the shared sign-in form: `#sign-in-form` with a `#key` input and
    /// a `#sign-in` button.
    pub async fn sign_in(&self, key: &str) {
        let input = self.wait_for("#sign-in-form:not([hidden]) #key").await;
        input.clear().await.expect("clear the key input");
        input.send_keys(key).await.expect("type the key");
        self.wait_for("#sign-in")
            .await
            .click()
            .await
            .expect("click sign in");
    }

    /// Resizes the window so the page is `width` CSS px wide, and waits until it is (and for the
    /// page to re-draw at that width: the dashboard's charts re-draw 100 ms after a resize).
    pub async fn set_width(&self, width: u32) {
        self.client
            .set_window_size(width, 1000)
            .await
            .expect("resize the window");
        let deadline = Instant::now() + WAIT;
        loop {
            let inner = self
                .client
                .execute("return window.innerWidth", vec![])
                .await
                .expect("window width");
            if inner.as_u64() == Some(u64::from(width)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the window never became {width} px wide: {inner}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    /// Asserts that nothing on the page is wider than the window (`width` px): no sideways
    /// scrolling. Names the elements that stick out, for whoever fixes the page.
    pub async fn assert_no_horizontal_overflow(&self, width: u32, what: &str) {
        let found = self
            .client
            .execute(
                "const wide = [...document.querySelectorAll('body *')]                    .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > innerWidth + 0.5)                    .slice(-8).map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.className} right=${Math.round(e.getBoundingClientRect().right)}`);                  return [Math.max(document.documentElement.scrollWidth, document.body.scrollWidth), wide];",
                vec![],
            )
            .await
            .expect("page widths");
        let scroll_width = found[0].as_u64().expect("a width");
        assert!(
            scroll_width <= u64::from(width),
            "{what} overflows a {width} px window: {scroll_width} px wide; sticking out: {}",
            found[1]
        );
    }

    /// The whole page at `width` as `target/test-artifacts/{name}-{width}.png`, for a person to
    /// look at; the window is `width` px wide again afterwards.
    pub async fn save_screenshot_at(&self, name: &str, width: u32) {
        self.save_screenshot_sized(&format!("{name}-{width}.png"), width)
            .await;
        self.set_width(width).await;
    }

    /// Saves the whole page, not just the first screenful, as `target/test-artifacts/{name}`
    /// for a person to look at: the window is made tall enough for the page (plus the browser's
    /// own frame) and scrolled back to the top.
    pub async fn save_screenshot(&self, name: &str) {
        self.save_screenshot_sized(name, 1280).await;
    }

    async fn save_screenshot_sized(&self, name: &str, width: u32) {
        let sizes = self
            .client
            .execute(
                "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]",
                vec![],
            )
            .await
            .expect("page sizes");
        let [content, frame] = [0, 1].map(|index| sizes[index].as_u64().unwrap_or_default());
        let height = u32::try_from(content + frame)
            .unwrap_or(u32::MAX)
            .clamp(1000, 8000);
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize the window");
        self.client
            .execute("window.scrollTo(0, 0)", vec![])
            .await
            .expect("scroll to the top");
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
        std::fs::create_dir_all(&dir).expect("artifacts directory");
        std::fs::write(dir.join(name), png).expect("screenshot saved");
    }
}

/// Runs `check` with a fresh browser and closes the browser whatever happens: a failed
/// assertion inside `check` is re-raised once the session is closed.
pub async fn with_browser(check: impl AsyncFnOnce(&Browser)) {
    let browser = Browser::start().await;
    let outcome = std::panic::AssertUnwindSafe(check(&browser))
        .catch_unwind()
        .await;
    browser.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Asserts that a page the api serves needs nothing from outside the api: no scheme, no
/// protocol-relative or sourced resource, no stylesheet import, and links only within the page
/// (`#…`, `data:`) or to other paths of the same api (`/…`).
pub fn assert_self_contained(html: &str) {
    for forbidden in [
        "http://",
        "https://",
        "<script src",
        "src=",
        "@import",
        "url(",
        "//cdn",
    ] {
        assert!(!html.contains(forbidden), "the page contains {forbidden:?}");
    }
    for (index, _) in html.match_indices("href=\"") {
        let target = &html[index + 6..];
        let same_api = target.starts_with('/') && !target.starts_with("//");
        assert!(
            target.starts_with('#') || target.starts_with("data:") || same_api,
            "a link leaves the page: {}",
            &target[..target.len().min(40)]
        );
    }
}

async fn wait_until_ready(status_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = reqwest::Client::new();
    loop {
        if let Ok(response) = client.get(status_url).send().await
            && let Ok(status) = response.json::<Value>().await
            && status["value"]["ready"] == true
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GETs `path` from the api and answers the page, after checking that it is served as HTML and
/// loads nothing from anywhere else.
pub async fn self_contained_page(app: &crate::harness::TestApp, path: &str) -> String {
    let response = app
        .client
        .get(app.url(path))
        .send()
        .await
        .expect("the page answers");
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/html"),
        "{path}: {content_type}"
    );
    let html = response.text().await.expect("the page's html");
    assert_self_contained(&html);
    html
}

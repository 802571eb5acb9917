# Drives headless Chromium (Debian's, through chromedriver and python3-selenium) through the web
# inbox of a running `lua-smtp sink --http`, as a person would with the keyboard, and prints what it
# saw as one JSON line for spec/webinbox_browser_spec.lua to judge.
# argv: smtp_port http_port download_dir screenshot_dir
import http.server, json, os, smtplib, sys, threading, time, urllib.request
from email.message import EmailMessage
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.chrome.service import Service

smtp_port, http_port, dl_dir, shot_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
base = "http://127.0.0.1:%d/" % http_port
out = {"steps": []}

# A loopback HTTP server that counts what it is asked for: remote content and scripts in the mail
# point here, so a request means the sandbox or the CSP let something through.
hits = []
class Counter(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        hits.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "image/gif")
        self.end_headers()
        self.wfile.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    def log_message(self, *a):
        pass
counter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counter)
threading.Thread(target=counter.serve_forever, daemon=True).start()
cport = counter.server_address[1]

ATTACHMENT = bytes(range(256)) * 3 + b"end of the attachment\r\n"

def send(subject, to, html=None, attach=False, text="Hello from the browser test."):
    m = EmailMessage()
    m["From"] = "Ann Sender <ann@example.test>"
    m["To"] = to
    m["Subject"] = subject
    m.set_content(text)
    if html:
        m.add_alternative(html, subtype="html")
    if attach:
        m.add_attachment(ATTACHMENT, maintype="application", subtype="octet-stream", filename="report.bin")
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=20) as s:
        s.send_message(m)

def wait(cond, timeout=20, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = cond()
            if v:
                return v
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)

send("Weekly report", "Bob <bob@example.test>", text="The numbers for this week are in.")
send("Password reset", "carol@example.test", text="Follow the link to reset your password.")

opts = webdriver.ChromeOptions()
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1280,800", "--no-first-run", "--disable-extensions",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"):
    opts.add_argument(a)
opts.binary_location = "/usr/bin/chromium"
opts.add_experimental_option("prefs", {"download.default_directory": dl_dir,
                                       "download.prompt_for_download": False})
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": dl_dir})
    d.get(base)
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 2, what="the two messages listed")
    out["steps"].append("page lists the 2 messages already there")
    d.execute_script("window.__marker = 'same page'")

    # a message arrives while the page is open: it must show up without a reload
    html = ('<html><body><p id="greeting">Hello <b>sandboxed</b> world</p>'
            '<img id="remote" src="http://127.0.0.1:%d/remote.png" alt="remote image">'
            '<script>document.body.setAttribute("data-script-ran", "yes");'
            'new Image().src = "http://127.0.0.1:%d/script-ran";</script></body></html>') % (cport, cport)
    send("Invoice with attachment", "Dave <dave@example.test>", html=html, attach=True,
         text="Your invoice is attached.")
    wait(lambda: "Invoice with attachment" in d.find_element(By.CSS_SELECTOR, "#list li").text,
         what="the new message at the top of the list")
    out["live"] = d.execute_script("return window.__marker") == "same page"
    out["steps"].append("new message appeared at the top without a reload")
    d.save_screenshot(os.path.join(shot_dir, "inbox-list.png"))

    # keyboard only: focus the list, move to the newest, open it
    d.find_element(By.TAG_NAME, "body").send_keys("/")
    out["search_focused"] = d.switch_to.active_element.get_attribute("id") == "search"
    d.switch_to.active_element.send_keys(Keys.ESCAPE)
    out["list_focused"] = d.switch_to.active_element.get_attribute("id") == "list"
    d.switch_to.active_element.send_keys("j")
    d.switch_to.active_element.send_keys(Keys.ENTER)
    frame = wait(lambda: d.find_element(By.ID, "html-frame"), what="the HTML view")
    out["sandbox"] = frame.get_attribute("sandbox")
    out["steps"].append("opened with the keyboard (/, Esc, j, Enter)")
    d.switch_to.frame(frame)
    out["html_text"] = wait(lambda: d.find_element(By.ID, "greeting").text, what="the HTML inside the frame")
    out["script_ran"] = d.find_element(By.TAG_NAME, "body").get_attribute("data-script-ran")
    d.switch_to.default_content()
    time.sleep(1.0)   # let anything the mail tried reach the counter
    out["hits_before"] = list(hits)
    d.save_screenshot(os.path.join(shot_dir, "inbox-message.png"))
    out["steps"].append("HTML shown sandboxed: script did not run, remote image not fetched")

    # asking for remote content fetches the image, still without running the script
    d.find_element(By.ID, "load-remote").click()
    wait(lambda: "/remote.png" in hits, what="the remote image after 'Load remote images'")
    time.sleep(0.5)
    out["hits_after"] = list(hits)
    out["steps"].append("'Load remote images' fetched the image only")

    # the other views
    for key, tab in (("2", "text"), ("3", "headers"), ("4", "raw"), ("5", "mime")):
        d.find_element(By.TAG_NAME, "body").send_keys(key)
        wait(lambda: d.find_element(By.ID, "tab-" + tab).get_attribute("aria-selected") == "true", what=tab)
    out["mime"] = d.find_element(By.ID, "panel").text
    out["steps"].append("text, headers, source and MIME views by keys 2-5")

    # download the attachment
    link = d.find_element(By.CSS_SELECTOR, "#atts a.attachment")
    link.click()
    path = os.path.join(dl_dir, "report.bin")
    wait(lambda: os.path.exists(path) and not any(f.endswith(".crdownload") for f in os.listdir(dl_dir)),
         what="the downloaded attachment")
    out["download_ok"] = open(path, "rb").read() == ATTACHMENT
    out["steps"].append("attachment downloaded with the right bytes")

    # delete it with the Delete key: gone from the list and from the API
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.DELETE)
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 2, what="the list after the delete")
    # read in one script: the list may be drawn again (the delete's own answer, then its
    # server-sent event) between finding the items and reading them
    titles = d.execute_script("return Array.from(document.querySelectorAll('#list li'), li => li.textContent)")
    out["deleted"] = not any("Invoice" in t for t in titles)
    total = json.load(urllib.request.urlopen(base + "api/v1/messages", timeout=10))["total"]
    out["api_total"] = total
    out["steps"].append("deleted with the Delete key")
finally:
    d.quit()
    counter.shutdown()
print(json.dumps(out))

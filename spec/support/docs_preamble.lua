-- Run before each documentation block by spec/docs_spec.lua (and documented in docs/reference.md,
-- "How the examples run"). It points the example names at the local test sink, so blocks read as
-- a user would write them:
--   * a connection to smtp.example.com, smtp.gmail.com, smtp.office365.com, mail.example.org,
--     localhost, 127.0.0.1 or 192.0.2.25 on port 25, 465, 587 or 2525 goes to the sink (DOCS_PORT);
--   * MX lookups for example.org, example.com and example.net answer mx.example.org -> 192.0.2.25
--     (a documentation address: smtp.deliver refuses loopback by default, as it should);
--   * certificates are checked against the test CA (SSL_CERT_FILE, set by the spec);
-- and defines what blocks take as given: `msg` (a smtp.message from alice@example.com to
-- bob@example.org), `messages` (two of them), `pem` (an RSA DKIM key), `fetch_fresh_access_token`.
-- The working directory holds report.pdf, logo.png and a.csv.
local PORT = assert(tonumber(os.getenv("DOCS_PORT")), "DOCS_PORT")
local names = { ["smtp.example.com"] = true, ["smtp.gmail.com"] = true, ["smtp.office365.com"] = true,
  ["mail.example.org"] = true, ["localhost"] = true, ["127.0.0.1"] = true, ["mx.example.org"] = true,
  ["192.0.2.25"] = true }
local ports = { [25] = true, [465] = true, [587] = true, [2525] = true }

local native = require "smtp.transport.native"
local real_connect = native.connect
native.connect = function(o)
  if type(o) == "table" and names[o.host] and ports[o.port] then
    local c = {}
    for k, v in pairs(o) do c[k] = v end
    c.host, c.port = "127.0.0.1", PORT
    return real_connect(c)
  end
  return real_connect(o)
end

local mx = require "smtp.mx"
local real_lookup = mx.lookup
local fake_domains = { ["example.org"] = true, ["example.com"] = true, ["example.net"] = true }
mx.lookup = function(domain, opts)
  if type(domain) == "string" and fake_domains[domain:lower()] then
    return { { host = "mx.example.org", preference = 10, addresses = { "192.0.2.25" } } }
  end
  return real_lookup(domain, opts)
end

local message = require "smtp.message"
msg = assert(message.new {
  from = "Alice <alice@example.com>", to = { "bob@example.org" }, subject = "Hello",
  text = "Hello Bob",
})
messages = {
  msg,
  assert(message.new { from = "alice@example.com", to = { "carol@example.org" }, subject = "Hi", text = "Hi Carol" }),
}
local f = io.open(assert(os.getenv("DOCS_DKIM_KEY"), "DOCS_DKIM_KEY"), "rb")
pem = f:read("*a")
f:close()
function fetch_fresh_access_token() return "ya29.token" end

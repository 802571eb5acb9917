-- DKIM: signs a message as it streams (message.new{ dkim = ... }) with an Ed25519 or RSA key, prints
-- the DNS TXT record to publish and the DKIM-Signature field, then sends it.
--   DKIM_KEY=private.pem SMTP_HOST=localhost SMTP_PORT=2525 SMTP_CAFILE=ca.pem lua5.4 examples/dkim_sign.lua
-- Without DKIM_KEY a throwaway Ed25519 key is made with openssl. Without SMTP_PORT nothing is sent.
-- SMTP_TLS picks the TLS mode (default starttls); SMTP_USER/SMTP_PASSWORD log in.
if not pcall(require, "smtp.core") then -- run from a checkout: its modules and build
  local top = (arg and arg[0] or "./x"):gsub("[^/]*$", "") .. ".."
  package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
  package.cpath = top .. "/build/" .. (jit and "luajit" or "lua" .. _VERSION:match("%d+%.%d+")) .. "/?.so;" .. package.cpath
end
local smtp = require "smtp"
local message = require "smtp.message"
local core = require "smtp.core"

local keyfile = os.getenv("DKIM_KEY")
local tmp
if not keyfile then
  tmp = os.tmpname()
  assert(os.execute("openssl genpkey -algorithm ed25519 -out " .. tmp .. " 2>/dev/null"), "openssl failed")
  keyfile = tmp
end
local f = assert(io.open(keyfile, "rb"))
local pem = f:read("*a")
f:close()
if tmp then os.remove(tmp) end

local key = assert(core.dkim_key(pem))
print(("publish: s1._domainkey.example.com TXT \"v=DKIM1; k=%s; p=%s\""):format(
  key:type() == "ed25519" and "ed25519" or "rsa", key:public()))

local msg = assert(message.new {
  from = "Alice <alice@example.com>", to = { "bob@example.org" },
  subject = "signed", text = "This message carries a DKIM signature.\n",
  dkim = { domain = "example.com", selector = "s1", key = pem },   -- algorithm follows the key
})
local raw = msg:tostring()
print(raw:match("^(DKIM%-Signature:.-)\r\n[^ \t]"))

local port = tonumber(os.getenv("SMTP_PORT") or "")
if not port then return end
local user = os.getenv("SMTP_USER")
local res, err = smtp.send {
  server = os.getenv("SMTP_HOST") or "localhost", port = port, tls = os.getenv("SMTP_TLS") or "starttls",
  cafile = os.getenv("SMTP_CAFILE"), message = msg, timeout = 20,
  auth = user and { user = user, password = os.getenv("SMTP_PASSWORD") or "" } or nil,
}
if not res then io.stderr:write("not sent: ", tostring(err), "\n"); os.exit(1) end
print(("sent: %d %s"):format(res.reply.code, res.reply.text or ""))

-- DKIM signing (RFC 6376, RFC 8463): rsa-sha256 and ed25519-sha256 over any RFC 5322 message,
-- with the hashing, canonicalization and key handling in the C core.
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = {}

-- RFC 6376 5.4.1: the fields worth signing when present. From is always signed.
M.default_headers = {
  "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to", "references",
  "sender", "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
  "content-id", "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
  "resent-cc", "resent-message-id", "list-id", "list-help", "list-unsubscribe",
  "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner", "list-archive",
}

-- Over-signed fields (RFC 6376 5.4.2, 8.15): named in h= once more than they occur, so that a copy
-- added above them, which readers would show instead, breaks the signature. These are the ones
-- readers display or that change how the message reads; named even when absent, so that adding
-- one (a Reply-To) breaks it too.
M.default_oversign = {
  "from", "to", "cc", "subject", "date", "reply-to", "message-id", "content-type",
  "content-transfer-encoding", "mime-version",
}
-- Over-signed only when present: a mailing list adds these to a message it passes on unchanged,
-- and that should not break the author's signature.
M.default_oversign_present = {
  "list-id", "list-unsubscribe", "list-unsubscribe-post", "list-post", "list-help", "list-archive",
  "list-owner", "list-subscribe",
}

local algorithms = { ["rsa-sha256"] = "rsa", ["ed25519-sha256"] = "ed25519" }
local canons = { simple = true, relaxed = true }

local function invalid(text) return errors.invalid("dkim: " .. text) end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local d = f:read("*a"); f:close()
  return d
end

-- A signer holds a parsed key and the fixed tags; dkim.sign and smtp.message both use it.
local Signer = {}
Signer.__index = Signer
Signer.__name = "smtp.dkim.signer"

-- dkim.signer(opts) -> signer | nil, err (kind "invalid") when an option or the key is bad.
function M.signer(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'signer' (options table expected)", 3) end
  local domain, selector = opts.domain, opts.selector
  if type(domain) ~= "string" or not domain:match("^[%w%-%._]+$") or #domain > 253 then
    return invalid("domain must be a domain name")
  end
  if type(selector) ~= "string" or not selector:match("^[%w%-%._]+$") then
    return invalid("selector must be a DNS label sequence")
  end
  local keytext = opts.key
  if type(keytext) ~= "string" or keytext == "" then return invalid("key (PEM text or file) required") end
  if not keytext:find("-----BEGIN", 1, true) then
    local d = read_file(keytext)
    if not d then return invalid("key file cannot be read: " .. keytext) end
    keytext = d
  end
  local key, kerr = core.dkim_key(keytext)
  if not key then return invalid(kerr) end
  local alg = opts.algorithm
  if alg == nil then alg = key:type() == "ed25519" and "ed25519-sha256" or "rsa-sha256" end
  if not algorithms[alg] then return invalid("unknown algorithm " .. tostring(alg)) end
  if algorithms[alg] ~= key:type() then
    return invalid("algorithm " .. alg .. " does not match the " .. key:type() .. " key")
  end
  local c = opts.canonicalization or "relaxed/relaxed"
  if type(c) ~= "string" then return invalid("canonicalization must be a string") end
  local hc, bc = c:match("^(%a+)/(%a+)$")
  if not hc then hc, bc = c:match("^(%a+)$"), "simple" end
  if not (hc and canons[hc] and canons[bc]) then return invalid("bad canonicalization " .. c) end
  local headers = opts.headers or M.default_headers
  if type(headers) ~= "table" then return invalid("headers must be a list of names") end
  local names, seen = {}, {}
  for _, h in ipairs(headers) do
    if type(h) ~= "string" or not h:match("^[!-9;-~]+$") then
      return invalid("bad header name in headers: " .. tostring(h))
    end
    h = h:lower()
    if not seen[h] and h ~= "dkim-signature" then seen[h] = true; names[#names + 1] = h end
  end
  if not seen.from then seen.from = true; table.insert(names, 1, "from") end
  -- name -> "always" | "present": how many extra times it goes into h=
  local over = {}
  for _, o in ipairs({ { "oversign", M.default_oversign, "always" },
                       { "oversign_present", M.default_oversign_present, "present" } }) do
    local list = opts[o[1]]
    if list == nil then list = o[2] end
    if list ~= false then
      if type(list) ~= "table" then return invalid(o[1] .. " must be a list of names or false") end
      for _, h in ipairs(list) do
        if type(h) ~= "string" or not h:match("^[!-9;-~]+$") then
          return invalid("bad header name in " .. o[1] .. ": " .. tostring(h))
        end
        h = h:lower()
        if h ~= "dkim-signature" then
          if not over[h] then over[h] = o[3] end
          -- an over-signed name is signed too, or its one h= entry would pick the field itself
          if not seen[h] then seen[h] = true; names[#names + 1] = h end
        end
      end
    end
  end
  local ts = opts.timestamp
  if ts ~= nil and ts ~= false and (type(ts) ~= "number" or ts < 0) then
    return invalid("timestamp must be seconds or false")
  end
  local identity = opts.identity
  if identity ~= nil and (type(identity) ~= "string" or identity:find("[%c%s;]")) then
    return invalid("identity must be an address-like string")
  end
  return setmetatable({ key = key, algorithm = alg, hcanon = hc, bcanon = bc, domain = domain,
                        selector = selector, names = names, over = over, timestamp = ts, identity = identity },
                      Signer)
end

-- A running body hash for this signer's body canonicalization.
function Signer:body_hasher()
  return core.dkim_body(self.bcanon)
end

-- Folds "tag=value" items into a header value no wider than 78 columns where it can.
local function fold_tags(items, start)
  local out, col = {}, start
  for i, item in ipairs(items) do
    local piece = item .. (i < #items and ";" or "")
    if col + 1 + #piece > 78 and col > start then
      out[#out + 1] = "\r\n " .. piece; col = 1 + #piece
    else
      out[#out + 1] = " " .. piece; col = col + 1 + #piece
    end
  end
  return table.concat(out)
end

local function fold_b64(s, col)
  local out, i = {}, 1
  local first = math.max(78 - col, 8)
  out[1] = s:sub(1, first); i = first + 1
  while i <= #s do out[#out + 1] = "\r\n " .. s:sub(i, i + 71); i = i + 72 end
  return table.concat(out)
end

-- signer:sign(fields, bodyhash [, now]) -> "DKIM-Signature: ...\r\n".
-- fields: the message's header fields in order, each the raw text of one field without its final
-- CRLF (folding lines joined by CRLF). bodyhash: the raw digest from body_hasher():digest().
function Signer:sign(fields, bodyhash, now)
  -- pick instances bottom-up, as verifiers do (RFC 6376 5.4.2)
  local byname = {}
  for _, f in ipairs(fields) do
    local n = f:match("^([^:]*)"):gsub("[ \t]+$", ""):lower()
    local l = byname[n]; if not l then l = {}; byname[n] = l end
    l[#l + 1] = f
  end
  local hnames, data = {}, {}
  for _, n in ipairs(self.names) do
    local l = byname[n]
    if l then
      for i = #l, 1, -1 do
        hnames[#hnames + 1] = n
        data[#data + 1] = core.dkim_header(l[i], self.hcanon)
      end
    end
    -- one entry more than there are fields: it hashes as nothing now, and picks up any copy added later
    local o = self.over[n]
    if o == "always" or (o == "present" and l) then hnames[#hnames + 1] = n end
  end
  local tags = { "v=1", "a=" .. self.algorithm, "c=" .. self.hcanon .. "/" .. self.bcanon,
                 "d=" .. self.domain, "s=" .. self.selector }
  if self.identity then tags[#tags + 1] = "i=" .. self.identity end
  local ts = self.timestamp
  if ts == nil then ts = now or os.time() end
  if ts then tags[#tags + 1] = string.format("t=%d", ts) end
  local h = { "h=" }
  local hcol = 0
  for i, n in ipairs(hnames) do
    local piece = n .. (i < #hnames and ":" or "")
    if hcol + #piece > 70 then h[#h + 1] = "\r\n "; hcol = 1 end
    h[#h + 1] = piece; hcol = hcol + #piece
  end
  tags[#tags + 1] = table.concat(h)
  tags[#tags + 1] = "bh=" .. core.b64encode(bodyhash)
  tags[#tags + 1] = "b="
  local head = "DKIM-Signature:" .. fold_tags(tags, #"DKIM-Signature:")
  data[#data + 1] = core.dkim_header(head, self.hcanon):sub(1, -3)  -- no CRLF after the b= tag
  local sig, err = self.key:sign(table.concat(data))
  if not sig then return nil, errors.new{ kind = "invalid", text = "dkim: " .. err } end
  local lastcol = #head:match("[^\n]*$")
  return head .. fold_b64(core.b64encode(sig), lastcol) .. "\r\n"
end

-- Splits a CRLF message into its header fields (without final CRLFs) and the body offset.
function M.split_header(raw)
  local fields, pos = {}, 1
  while true do
    local e = raw:find("\r\n", pos, true)
    if not e then
      -- a message with no body and no final CRLF after the last field
      if pos <= #raw then fields[#fields + 1] = raw:sub(pos) end
      return fields, #raw + 1
    end
    if e == pos then return fields, e + 2 end
    local line = raw:sub(pos, e - 1)
    if line:match("^[ \t]") and #fields > 0 then
      fields[#fields] = fields[#fields] .. "\r\n" .. line
    else
      fields[#fields + 1] = line
    end
    pos = e + 2
  end
end

-- dkim.sign(raw, opts) -> raw with its DKIM-Signature field prepended | nil, err.
-- The hash covers the message as it goes on the wire, where bare CR and LF become CRLF.
function M.sign(raw, opts)
  if type(raw) ~= "string" then error("bad argument #1 to 'sign' (message string expected)", 2) end
  if type(opts) ~= "table" then error("bad argument #2 to 'sign' (options table expected)", 2) end
  local signer, err = M.signer(opts)
  if not signer then return nil, err end
  local norm = raw
  if raw:find("[\r\n]") and (raw:find("\r[^\n]") or raw:find("[^\r]\n") or raw:find("^\n") or raw:find("\r$")) then
    norm = raw:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")
  end
  local fields, bodypos = M.split_header(norm)
  local hasFrom = false
  for _, f in ipairs(fields) do
    if f:match("^[Ff][Rr][Oo][Mm][ \t]*:") then hasFrom = true end
    if not f:find(":", 1, true) then return invalid("malformed header field: " .. f:sub(1, 40)) end
  end
  if not hasFrom then return invalid("message has no From field") end
  local h = signer:body_hasher()
  h:update(bodypos <= #norm and norm:sub(bodypos) or "")
  local sig, serr = signer:sign(fields, h:digest())
  if not sig then return nil, serr end
  return sig .. raw
end

return M

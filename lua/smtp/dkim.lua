-- DKIM signing and verifying (RFC 6376, RFC 8463, RFC 8301): rsa-sha256 and ed25519-sha256 over
-- any RFC 5322 message, with the hashing, canonicalization and key handling in the C core.
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
  local exp = opts.expiration
  if exp ~= nil and (type(exp) ~= "number" or exp < 0 or exp ~= math.floor(exp)) then
    return invalid("expiration must be seconds since the epoch")
  end
  -- verifiers refuse x= not after t= (RFC 6376 3.5)
  if exp and ts and exp <= ts then return invalid("expiration must be after the timestamp") end
  local identity = opts.identity
  if identity ~= nil and (type(identity) ~= "string" or identity:find("[%c%s;]")) then
    return invalid("identity must be an address-like string")
  end
  return setmetatable({ key = key, algorithm = alg, hcanon = hc, bcanon = bc, domain = domain,
                        selector = selector, names = names, over = over, timestamp = ts, identity = identity,
                        expiration = exp },
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
  if self.expiration and ts and self.expiration <= ts then
    return nil, errors.new{ kind = "invalid", text = "dkim: expiration must be after the timestamp" }
  end
  if self.expiration then tags[#tags + 1] = string.format("x=%d", self.expiration) end
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

---------------------------------------------------------------------------------------------------
-- Verification (RFC 6376 6). One result per DKIM-Signature field, in RFC 8601's words:
--   pass; fail (the body hash or the signature does not match); neutral (the signature field
--   does not parse or lacks what RFC 6376 requires); policy (valid in form but not acceptable:
--   rsa-sha1, a small RSA key, expired, dated in the future, a From field it does not cover,
--   more signatures than we check); temperror (the key could not be fetched now); permerror (no
--   key, a key record that does not parse, is revoked or does not fit the signature).

M.max_signatures = 10          -- signatures checked per message; the rest are "policy"
M.max_header = 1024 * 1024     -- bytes of header section read before giving up
M.clock_skew = 300             -- seconds of latitude for t= in the future and x= in the past
M.min_rsa_bits = 1024          -- RFC 8301 3.2

-- A tag-list (RFC 6376 3.2) -> tags (name -> value without the FWS around it), spans (name ->
-- first and last byte of the raw value, between "=" and ";" or the end) | nil, why.
local function parse_tags(s)
  local tags, spans = {}, {}
  local pos, n = 1, #s
  while pos <= n do
    local semi = s:find(";", pos, true)
    local stop = semi and semi - 1 or n
    local seg = s:sub(pos, stop)
    if seg:match("^[ \t\r\n]*$") then
      if semi then return nil, "empty tag" end
      break   -- a ";" may end the list
    end
    local name, eq = seg:match("^[ \t\r\n]*([A-Za-z][A-Za-z0-9_]*)[ \t\r\n]*()=")
    if not name then
      return nil, 'malformed tag "' .. seg:sub(1, 20):gsub("%c+", " "):gsub("^ +", "") .. '"'
    end
    if tags[name] then return nil, "duplicate tag " .. name end
    local first = pos + eq
    local value = s:sub(first, stop):gsub("^[ \t\r\n]+", ""):gsub("[ \t\r\n]+$", "")
    if value:find("[%z\1-\8\11\12\14-\31\127]") then return nil, "control character in " .. name .. "=" end
    tags[name], spans[name] = value, { first, stop }
    pos = stop + 2
  end
  return tags, spans
end
M.parse_tags = parse_tags

-- base64 with FWS removed, or nil when it is not base64.
local function b64_value(v)
  local c = v:gsub("[ \t\r\n]", "")
  if c == "" or #c % 4 ~= 0 or not c:match("^[A-Za-z0-9+/]*=?=?$") then return nil end
  return c
end

-- a colon-separated list (h=, q=, key h=, s=, t=) -> lower-case items, FWS removed
local function colon_list(v)
  local out = {}
  for item in (v .. ":"):gmatch("([^:]*):") do out[#out + 1] = (item:gsub("[ \t\r\n]", ""):lower()) end
  return out
end

local function has(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end

local function valid_domain(d)
  return #d <= 253 and d:match("^[%w_]") and d:match("[%w]$") and not d:find("..", 1, true)
    and d:match("^[%w%-%._]+$") ~= nil
end

-- a decimal tag value -> number; huge values (more digits than fit) become math.huge
local function decimal(v)
  if not v:match("^%d+$") then return nil end
  if #v > 15 then return math.huge end
  return tonumber(v)
end

local key_types = { ["rsa-sha256"] = "rsa", ["ed25519-sha256"] = "ed25519" }

-- Checks one DKIM-Signature field (RFC 6376 3.5, 6.1.1). -> sig, or nil and the result table
-- (with what could be read of d=, s=, ... filled in).
local function parse_signature(field, now, skew)
  local colon = field:find(":", 1, true)
  local r = { result = "neutral" }
  if not colon then r.reason = "signature syntax: no colon"; return nil, r end
  local tags, spans = parse_tags(field:sub(colon + 1))
  if not tags then r.reason = "signature syntax: " .. spans; return nil, r end
  if tags.d and valid_domain(tags.d) then r.d = tags.d end
  if tags.s and tags.s:match("^[%w%-%._]+$") then r.s = tags.s end
  if tags.a and tags.a:match("^[%w%-]+$") then r.a = tags.a:lower() end
  r.b = tags.b and b64_value(tags.b)
  local function bad(why, result) r.reason = why; r.result = result or "neutral"; return nil, r end
  for _, t in ipairs({ "v", "a", "b", "bh", "d", "h", "s" }) do
    if not tags[t] then return bad("signature lacks " .. t .. "=") end
  end
  if tags.v ~= "1" then return bad("v= is not 1") end
  if not r.d then return bad("d= is not a domain name") end
  if not r.s then return bad("s= is not a selector") end
  if not r.b then return bad("b= is not base64") end
  local bh = b64_value(tags.bh)
  if not bh then return bad("bh= is not base64") end
  local c = tags.c or "simple/simple"
  local hc, bc = c:lower():match("^(%a+)/(%a+)$")
  if not hc then hc, bc = c:lower():match("^(%a+)$"), "simple" end
  if not (hc and canons[hc] and canons[bc]) then return bad("unknown canonicalization c=" .. c) end
  r.c = hc .. "/" .. bc
  local h = colon_list(tags.h)
  for _, n in ipairs(h) do
    if not n:match("^[!-9;-~]+$") then return bad("h= holds a bad field name") end
  end
  if not has(h, "from") then return bad("h= does not sign From") end
  local i = tags.i and tags.i:gsub("\r\n", "")
  if i then
    if i:find("%c") then return bad("i= is not an identity") end
    local idom = i:match("@([^@]*)$")
    if not idom then return bad("i= is not an identity") end
    idom = idom:lower()
    local d = r.d:lower()
    if idom ~= d and idom:sub(-#d - 1) ~= "." .. d then return bad("i= is not within d=") end
    r.i = i
  else
    r.i = "@" .. r.d
  end
  local l
  if tags.l then
    if not tags.l:match("^%d+$") or #tags.l > 76 then return bad("l= is not a number") end
    l = decimal(tags.l)
    r.l = l
  end
  if tags.q and not has(colon_list(tags.q), "dns/txt") then return bad("q= does not offer dns/txt") end
  local t, x
  if tags.t then
    t = decimal(tags.t)
    if not t then return bad("t= is not a number") end
    r.t = t
  end
  if tags.x then
    x = decimal(tags.x)
    if not x then return bad("x= is not a number") end
    if t and x <= t then return bad("x= is not after t=") end
    r.x = x
  end
  if not key_types[r.a] then
    if r.a == "rsa-sha1" then return bad("rsa-sha1 is not accepted (RFC 8301)", "policy") end
    return bad("unknown algorithm a=" .. tags.a)
  end
  if x and x + skew < now then return bad("signature expired", "policy") end
  if t and t > now + skew then return bad("signature dated in the future", "policy") end
  -- the field as hashed: the b= value and the FWS around it deleted (RFC 6376 3.7)
  local sp = spans.b
  local unsigned = field:sub(1, colon + sp[1] - 1) .. field:sub(colon + sp[2] + 1)
  return { r = r, h = h, hc = hc, bc = bc, l = l, bh = core.b64decode(bh), b = core.b64decode(r.b),
           unsigned = unsigned, keytype = key_types[r.a] }
end

-- Parses a key record (RFC 6376 3.6.1, RFC 8463 4) for sig -> pubkey, testing | nil, result, why.
local function parse_key(record, sig)
  local tags, why = parse_tags(record)
  if not tags then return nil, "permerror", "key record syntax: " .. why end
  if tags.v and tags.v ~= "DKIM1" then return nil, "permerror", "key record v= is not DKIM1" end
  if tags.h and not has(colon_list(tags.h), "sha256") then
    return nil, "permerror", "key does not allow sha256"
  end
  local k = (tags.k or "rsa"):lower()
  if k ~= "rsa" and k ~= "ed25519" then return nil, "permerror", "unknown key type k=" .. k end
  if k ~= sig.keytype then return nil, "permerror", "key type " .. k .. " does not fit a=" .. sig.r.a end
  if tags.s then
    local svc = colon_list(tags.s)
    if not (has(svc, "*") or has(svc, "email")) then return nil, "permerror", "key is not for email" end
  end
  if not tags.p then return nil, "permerror", "key record has no p=" end
  local p = tags.p:gsub("[ \t\r\n]", "")
  if p == "" then return nil, "permerror", "key revoked" end
  p = b64_value(p)
  if not p then return nil, "permerror", "key p= is not base64" end
  local key, kerr = core.dkim_pubkey(core.b64decode(p), k)
  if not key then return nil, "permerror", "key syntax: " .. kerr end
  local flags = tags.t and colon_list(tags.t) or {}
  if has(flags, "s") then
    -- t=s: the i= domain must be d= itself, not a subdomain
    if sig.r.i:match("@([^@]*)$"):lower() ~= sig.r.d:lower() then
      return nil, "permerror", "key t=s forbids a subdomain in i="
    end
  end
  if k == "rsa" and key:bits() < M.min_rsa_bits then
    return nil, "policy", "RSA key of " .. key:bits() .. " bits is too small (RFC 8301)"
  end
  return key, has(flags, "y")
end

-- The key record(s) for selector/domain: records | nil, result, why. opts.key (tests, caches)
-- or DNS TXT <selector>._domainkey.<domain>.
local function fetch_key(sig, opts)
  local recs, err
  if opts.key then
    recs, err = opts.key(sig.r.s, sig.r.d)
  else
    local dns = require("smtp.transport").dns()
    recs, err = dns.query(sig.r.s .. "._domainkey." .. sig.r.d, "TXT",
      { nameservers = opts.nameservers, timeout = opts.timeout })
  end
  if type(recs) == "string" then recs = { recs } end
  if type(recs) ~= "table" or #recs == 0 then
    if type(err) == "table" and err.temporary then
      return nil, "temperror", "key lookup: " .. tostring(err.text or err)
    end
    return nil, "permerror", "no key for signature"
  end
  return recs
end

-- The message as a chunk reader; raises "bad argument" for what is not a message.
local function reader_of(message)
  local t = type(message)
  if t == "string" then
    local pos = 1
    return function()
      if pos > #message then return nil end
      local s = message:sub(pos, pos + 65535)
      pos = pos + 65536
      return s
    end
  elseif io.type(message) == "file" then
    return function()
      local d, err = message:read(16384)
      if d == nil and err then error("message read: " .. tostring(err), 0) end
      return d
    end
  elseif (t == "table" or t == "userdata") and type(message.read) == "function" then
    -- the server's reader (or any object with read(n))
    return function()
      local c = message:read(16384)
      if c ~= nil and type(c) ~= "string" then
        error("message reader gave a " .. type(c) .. " instead of a string", 0)
      end
      return c
    end
  elseif t == "function" then
    return function()
      local c = message()
      if c ~= nil and type(c) ~= "string" then
        error("message source gave a " .. type(c) .. " instead of a string", 0)
      end
      return c
    end
  end
  error("bad argument #1 to 'verify' (string, file, function or reader expected)", 3)
end

-- Line ends as the signer sends them: CRLF, with a bare CR or LF made into one. st.cr: the last
-- chunk ended in CR (made CRLF already), so an LF starting this one belongs to it.
local function normalize(s, st)
  if st.cr and s:byte(1) == 10 then s = s:sub(2) end
  st.cr = s:byte(-1) == 13
  if s:find("[\r\n]") then s = s:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n") end
  return s
end

-- Reads up to the empty line. -> header text (its fields with their CRLFs), the body bytes read
-- with it (normalized) | nil, "too large"
local function read_header(read, st, max)
  local pieces, size, tail = {}, 0, "\r\n"   -- "\r\n": as if a line ended before the message
  while true do
    local c = read()
    if c == nil then return table.concat(pieces), "" end
    c = normalize(c, st)
    local p = (tail .. c):find("\r\n\r\n", 1, true)
    if p then
      -- the empty line's CRLF starts at offset q + 2 of the content (0-based)
      local cut = p - #tail + 1    -- where in c the field's CRLF ends
      pieces[#pieces + 1] = c:sub(1, cut)
      if size + cut > max then return nil end
      return table.concat(pieces), c:sub(cut + 3)
    end
    pieces[#pieces + 1] = c
    size = size + #c
    if size > max then return nil end
    tail = (tail .. c):sub(-3)
  end
end

-- RFC 6008: header.b is the shortest prefix (8 characters at least) that tells the signature
-- apart from the others on the message.
local function header_b(results)
  for _, r in ipairs(results) do
    if r.b then
      local n = math.min(8, #r.b)
      for _, o in ipairs(results) do
        if o ~= r and o.b and o.b ~= r.b then
          while n < #r.b and o.b:sub(1, n) == r.b:sub(1, n) do n = n + 1 end
        end
      end
      r.header_b = r.b:sub(1, n)
    end
  end
end

-- dkim.verify(message, opts) -> results | nil, err. message: a string, a file or a function
-- returning chunks. The header section is read whole (up to opts.max_header); the body streams
-- through the hashes, so memory stays bounded however large the message.
function M.verify(message, opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then error("bad argument #2 to 'verify' (options table expected)", 2) end
  if opts.key ~= nil and type(opts.key) ~= "function" then
    error("bad argument #2 to 'verify' (key must be a function)", 2)
  end
  local read = reader_of(message)
  local now = opts.now or os.time()
  local skew = opts.clock_skew or M.clock_skew
  local maxsig = opts.max_signatures or M.max_signatures
  local st = { cr = false }
  local ok, header, first = pcall(read_header, read, st, opts.max_header or M.max_header)
  if not ok then
    if errors.is(header) then return nil, header end
    return nil, errors.new { kind = "invalid", text = "dkim: " .. tostring(header) }
  end
  if not header then
    return { { result = "permerror", reason = "header section too large" }, from_fields = 0 }
  end
  local fields = M.split_header(header)
  local results, sigs = {}, {}
  local byname, froms = {}, 0
  for _, f in ipairs(fields) do
    local n = f:match("^([^:]*)"):gsub("[ \t]+$", ""):lower()
    local l = byname[n]; if not l then l = {}; byname[n] = l end
    l[#l + 1] = f
  end
  froms = byname.from and #byname.from or 0
  -- the From field for DMARC (smtp.auth.check): its value, when there is exactly one
  local function finish(rs)
    rs.from_fields = froms
    if froms == 1 then rs.from = byname.from[1]:match("^[^:]*:(.*)$"):gsub("\r\n", "") end
    return rs
  end
  for _, f in ipairs(byname["dkim-signature"] or {}) do
    if #results >= maxsig then
      results[#results + 1] = { result = "policy", reason = "more than " .. maxsig .. " signatures" }
    else
      local sig, r = parse_signature(f, now, skew)
      if sig then
        r = sig.r
        sigs[#sigs + 1] = sig
        local nfrom = 0
        for _, n in ipairs(sig.h) do if n == "from" then nfrom = nfrom + 1 end end
        if froms > nfrom then
          r.result, r.reason, sig.done = "policy", "a From field is not signed", true
        end
      end
      results[#results + 1] = r
    end
  end
  if #results == 0 then return finish({ { result = "none", reason = "no signatures" } }) end

  -- keys, once per selector and domain
  local keys = {}
  for _, sig in ipairs(sigs) do
    if not sig.done then
      local name = sig.r.s:lower() .. "._domainkey." .. sig.r.d:lower()
      local recs = keys[name]
      local res, why
      if not recs then
        recs, res, why = fetch_key(sig, opts)
        keys[name] = recs or { fail = { res, why } }
      elseif recs.fail then
        res, why = recs.fail[1], recs.fail[2]
      end
      if recs and not recs.fail then
        -- several records: the first that makes a key for this signature (RFC 6376 6.1.2)
        for _, rec in ipairs(recs) do
          local key, a, b
          if type(rec) == "string" then
            key, a, b = parse_key(rec, sig)
          else
            a, b = "permerror", "key record is not a string"
          end
          if key then sig.key, sig.r.testing = key, a or nil; break end
          if not res then res, why = a, b end
        end
      end
      if not sig.key then sig.r.result, sig.r.reason, sig.done = res, why, true end
    end
  end

  -- the body, once per canonicalization and l=
  local hashers, list = {}, {}
  for _, sig in ipairs(sigs) do
    if not sig.done then
      local limit = (sig.l and sig.l ~= math.huge) and sig.l or nil
      local id = sig.bc .. ":" .. tostring(limit)
      local h = hashers[id]
      if not h then
        h = core.dkim_body(sig.bc, limit)
        hashers[id] = h; list[#list + 1] = h
      end
      sig.hasher = h
    end
  end
  if #list > 0 then
    local rok, rerr = pcall(function()
      for _, h in ipairs(list) do h:update(first) end
      local c = read()
      if c and st.cr and c:byte(1) == 10 then c = c:sub(2) end
      while c do
        for _, h in ipairs(list) do h:update(c) end
        c = read()
      end
    end)
    if not rok then
      if errors.is(rerr) then return nil, rerr end
      return nil, errors.new { kind = "invalid", text = "dkim: " .. tostring(rerr) }
    end
  end
  local digests = {}
  for id, h in pairs(hashers) do digests[id] = { h:digest(), h:length() } end

  for _, sig in ipairs(sigs) do
    if not sig.done then
      local r = sig.r
      local limit = (sig.l and sig.l ~= math.huge) and sig.l or nil
      local d = digests[sig.bc .. ":" .. tostring(limit)]
      -- headers bottom-up per name, each instance once; a name listed more often than it
      -- occurs hashes as nothing (RFC 6376 5.4.2)
      local data, used = {}, {}
      for _, n in ipairs(sig.h) do
        local l = byname[n]
        local k = (used[n] or (l and #l + 1 or 1)) - 1
        used[n] = k
        if l and k >= 1 then data[#data + 1] = core.dkim_header(l[k], sig.hc) end
      end
      data[#data + 1] = core.dkim_header(sig.unsigned, sig.hc):sub(1, -3)
      local good = sig.key:verify(table.concat(data), sig.b)
      if sig.l then r.unsigned = sig.l <= d[2] and d[2] - sig.l or 0 end
      if sig.l and sig.l > d[2] then
        r.result, r.reason = "fail", "l= is longer than the body"
      elseif d[1] ~= sig.bh then
        r.result, r.reason = "fail", "body hash did not verify"
      elseif not good then
        r.result, r.reason = "fail", "signature did not verify"
      elseif sig.l and r.unsigned > 0 and opts.allow_partial_body == false then
        r.result, r.reason = "policy", "l= leaves " .. r.unsigned .. " body bytes unsigned"
      else
        r.result, r.reason = "pass", nil
        if sig.l and r.unsigned > 0 then r.reason = "l= leaves " .. r.unsigned .. " body bytes unsigned" end
      end
    end
  end
  header_b(results)
  -- reasons quote what the message said: no control characters in them
  for _, r in ipairs(results) do
    if r.reason then r.reason = r.reason:gsub("%c+", " ") end
  end
  return finish(results)
end
return M

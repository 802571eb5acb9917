-- smtp.auth: the receiving side's message authentication in one place: DMARC, SPF (smtp.spf,
-- loaded on first use), the Authentication-Results header (RFC 8601) built from their results,
-- and check(), which runs DKIM, SPF and DMARC over one message for a DATA handler.
local errors = require "smtp.errors"

local M = {}

M.dmarc = require "smtp.dmarc"

-- smtp.spf is loaded on first use (a caller of authentication_results alone never needs it); an
-- installation without it has auth.spf nil.
setmetatable(M, { __index = function(t, k)
  if k ~= "spf" then return nil end
  local ok, spf = pcall(require, "smtp.spf")
  if not ok then
    if not tostring(spf):find("module 'smtp.spf' not found", 1, true) then error(spf, 2) end
    return nil
  end
  rawset(t, "spf", spf.check)
  return spf.check
end })

-- RFC 2045 token: printable ASCII without SPACE and tspecials.
local function is_token(s)
  return s ~= "" and not s:find('[%z\1-\32\127-\255()<>@,;:\\"/%[%]?=]')
end

-- RFC 8601 pvalue forms besides a token: [local-part] "@" domain-name, or a domain-name.
local function is_domain(s)
  return #s <= 253 and s:match("^[%w%-_%.]+$") ~= nil and not s:find("..", 1, true)
    and s:sub(1, 1) ~= "." and s:sub(-1) ~= "."
end
local function is_addr(s)
  local lp, d = s:match("^(.*)@([^@]*)$")
  if not lp then return false end
  return (lp == "" or lp:match("^[%w!#$%%&'*+%-/=?^_`{|}~]+$") and not lp:find("..", 1, true)
    and lp:sub(1, 1) ~= "." and lp:sub(-1) ~= "." or false) and is_domain(d) and true or false
end

local function quoted(s)
  return '"' .. s:gsub('[\\"]', "\\%0") .. '"'
end

local function value(s)
  if is_token(s) then return s end
  return quoted(s)
end

local function pvalue(s)
  if is_token(s) or is_addr(s) or is_domain(s) then return s end
  return quoted(s)
end

local function comment(s)
  return "(" .. s:gsub("[\\()]", "\\%0") .. ")"
end

-- Reasons, comments and values often quote what a message or a DNS record said: control
-- characters (a CR LF that would start a new header field) become one space.
local function clean(s)
  if type(s) ~= "string" then s = tostring(s) end
  return (s:gsub("[%z\1-\31\127]+", " "))
end

-- One resinfo: method=result [reason=...] [(comment)] ptype.property=value...
-- props: a list of { "header.d", value } pairs, or a map (written in name order).
local function resinfo(e, level)
  local method, result = e.method, e.result
  if type(method) ~= "string" or not method:match("^[%w][%w%-_]*$") then
    error("bad argument #2 to 'authentication_results' (bad method " .. tostring(method) .. ")", level)
  end
  if type(result) ~= "string" or not result:match("^[%w][%w%-_]*$") then
    error("bad argument #2 to 'authentication_results' (bad result for " .. method .. ")", level)
  end
  local words = { method .. "=" .. result }
  if e.reason and e.reason ~= "" then
    words[#words + 1] = "reason=" .. value(clean(e.reason))
  end
  if e.comment and e.comment ~= "" then words[#words + 1] = comment(clean(e.comment)) end
  local props = e.props or {}
  local list = {}
  if #props > 0 then
    list = props
  else
    for k, v in pairs(props) do list[#list + 1] = { k, v } end
    table.sort(list, function(a, b) return a[1] < b[1] end)
  end
  for _, p in ipairs(list) do
    local name, v = p[1], p[2]
    if type(name) ~= "string" or not name:match("^[%w%-_]+%.[%w%-_]+$") then
      error("bad argument #2 to 'authentication_results' (bad property " .. tostring(name) .. ")", level)
    end
    if v ~= nil and v ~= "" then
      words[#words + 1] = name .. "=" .. pvalue(clean(v))
    end
  end
  return words
end

-- The entries of the results table, in the order they are written: dkim, spf, dmarc, then the
-- list part.
local function entries(results)
  local out = {}
  local dk = results.dkim
  if dk then
    if dk.result then dk = { dk } end
    for _, r in ipairs(dk) do
      out[#out + 1] = { method = "dkim", result = r.result, reason = r.result ~= "pass" and r.reason or nil,
        props = { { "header.d", r.d }, { "header.i", r.i }, { "header.s", r.s }, { "header.a", r.a },
                  { "header.b", r.header_b } } }
    end
  end
  local spf = results.spf
  if spf then
    local props
    if spf.identity == "helo" or (spf.helo and not spf.mailfrom and not spf.sender) then
      props = { { "smtp.helo", spf.helo or spf.domain } }
    else
      props = { { "smtp.mailfrom", spf.mailfrom or spf.sender or spf.domain } }
    end
    out[#out + 1] = { method = "spf", result = spf.result,
      reason = spf.result ~= "pass" and spf.result ~= "none" and spf.reason or nil, props = props }
  end
  local dm = results.dmarc
  if dm then
    local c
    if dm.policy then c = "p=" .. dm.policy .. " dis=" .. (dm.disposition or "none") end
    out[#out + 1] = { method = "dmarc", result = dm.result, comment = c,
      reason = dm.result ~= "pass" and dm.result ~= "fail" and dm.reason or nil,
      props = { { "header.from", dm.domain } } }
  end
  for _, e in ipairs(results) do out[#out + 1] = e end
  return out
end

-- Lines of at most `width` columns where spaces allow: each word goes on the line if it fits,
-- else starts a continuation line (" " + word). A quoted value may be broken at its own spaces:
-- unfolding gives the space back.
local function fold(first, groups, width)
  local lines, cur = {}, first
  local function put(word, sep)
    if #cur + #sep + #word > width and #cur > 1 then
      lines[#lines + 1] = cur
      cur = " " .. word
    else
      cur = cur .. sep .. word
    end
  end
  for gi, words in ipairs(groups) do
    lines[#lines + 1] = cur
    cur = " "
    for wi, w in ipairs(words) do
      if gi < #groups and wi == #words then w = w .. ";" end
      local pieces = {}
      if w:sub(1, 1) ~= "(" and w:find('"', 1, true) then
        for p in (w .. " "):gmatch("([^ ]*) ") do pieces[#pieces + 1] = p end
      else
        pieces[1] = w
      end
      for pi, p in ipairs(pieces) do put(p, (wi == 1 and pi == 1) and "" or " ") end
    end
  end
  lines[#lines + 1] = cur
  return table.concat(lines, "\r\n") .. "\r\n"
end

-- auth.authentication_results(authserv_id, results) -> "Authentication-Results: ...\r\n", the
-- field to prepend to the message (RFC 8601), folded within 78 columns where it can be.
-- results: { dkim = (dkim.verify's list), spf = (auth.spf's result, or { result =, mailfrom = }
-- / { result =, helo = }), dmarc = (dmarc.check's result), {method =, result =, reason =,
-- comment =, props =}... }. No results at all: "none".
function M.authentication_results(authserv_id, results)
  if type(authserv_id) ~= "string" or authserv_id == "" or authserv_id:find("[%z\1-\32\127]") then
    error("bad argument #1 to 'authentication_results' (authserv-id expected)", 2)
  end
  if type(results) ~= "table" then error("bad argument #2 to 'authentication_results' (table expected)", 2) end
  local head = "Authentication-Results: " .. value(authserv_id) .. ";"
  local es = entries(results)
  if #es == 0 then return head .. " none\r\n" end
  local groups = {}
  for i, e in ipairs(es) do groups[i] = resinfo(e, 4) end
  return fold(head, groups, 78)
end

-- auth.check(message, opts) -> { dkim =, spf =, dmarc =, header = } | nil, err: DKIM over the
-- message, SPF for opts.ip / opts.mail_from / opts.helo (when ip is given), DMARC for the From field, and the Authentication-Results field for
-- opts.authserv_id. opts.dkim, opts.spf and opts.dmarc are passed to each check (with
-- nameservers and timeout from opts); message is what dkim.verify reads.
function M.check(message, opts)
  if type(opts) ~= "table" then error("bad argument #2 to 'check' (options table expected)", 2) end
  if type(opts.authserv_id) ~= "string" then error("bad argument #2 to 'check' (authserv_id expected)", 2) end
  local dkim = require "smtp.dkim"
  local function with_dns(t)
    local o = {}
    for k, v in pairs(t or {}) do o[k] = v end
    if o.nameservers == nil then o.nameservers = opts.nameservers end
    if o.timeout == nil then o.timeout = opts.timeout end
    return o
  end
  local out = {}
  local dres, err = dkim.verify(message, with_dns(opts.dkim))
  if not dres then return nil, err end
  out.dkim = dres
  if opts.ip and M.spf then
    local s, serr = M.spf(opts.ip, opts.mail_from, opts.helo, with_dns(opts.spf))
    if not s then return nil, serr end
    out.spf = s
  end
  if dres.from then
    local o = with_dns(opts.dmarc)
    o.from, o.dkim, o.spf = dres.from, dres, out.spf
    local d, derr = M.dmarc.check(o)
    if d then
      out.dmarc = d
    elseif errors.is(derr, "invalid") and derr.text:find("^dmarc: ") then
      out.dmarc = { result = "permerror", reason = derr.text:sub(8) }
    else
      return nil, derr
    end
  else
    out.dmarc = { result = "permerror", reason = (dres.from_fields or 0) == 0 and "no From field" or "several From fields" }
  end
  out.header = M.authentication_results(opts.authserv_id, out)
  return out
end

return M

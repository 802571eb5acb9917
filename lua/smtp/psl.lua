-- The Public Suffix List (publicsuffix.org) as Debian ships it (package publicsuffix): public
-- suffixes and registrable ("organizational", RFC 7489 3.2) domains, with the list's normal,
-- wildcard and exception rules. Loaded once on first use and kept.
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = {}

M.path = "/usr/share/publicsuffix/public_suffix_list.dat"

local List = {}
List.__index = List
List.__name = "smtp.psl"

-- A rule's or a domain's labels in the form they are compared in: lower case, A-labels.
local function ascii(name)
  name = name:lower():gsub("%.$", "")
  if name:find("[\128-\255]") then
    local a = core.idna_to_ascii(name)
    if not a then return nil end
    name = a:lower()
  end
  return name
end

-- psl.parse(text) -> list: one rule per line (its first word), "//" comments. ICANN and private
-- rules alike (what DMARC verifiers use: a private suffix such as a hosting provider's is a
-- boundary between organizations too).
function M.parse(text)
  if type(text) ~= "string" then error("bad argument #1 to 'parse' (string expected)", 2) end
  local l = setmetatable({ normal = {}, wild = {}, exception = {}, rules = 0 }, List)
  for line in text:gmatch("[^\r\n]+") do
    local rule = line:match("^%s*(%S+)")
    if rule and rule:sub(1, 2) ~= "//" then
      local kind = "normal"
      if rule:sub(1, 1) == "!" then
        kind, rule = "exception", rule:sub(2)
      elseif rule:sub(1, 2) == "*." then
        kind, rule = "wild", rule:sub(3)
      end
      rule = ascii(rule)
      if rule and rule ~= "" and not rule:find("*", 1, true) then
        l[kind][rule] = true
        l.rules = l.rules + 1
      end
    end
  end
  return l
end

local cached = {}

-- psl.load([path]) -> list | nil, err (the list of `path`, default psl.path, read once).
function M.load(path)
  path = path or M.path
  if cached[path] then return cached[path] end
  local f = io.open(path, "rb")
  if not f then
    return errors.invalid("public suffix list not found: " .. path ..
      " (Debian package publicsuffix)")
  end
  local text = f:read("*a")
  f:close()
  local l = M.parse(text)
  if l.rules == 0 then return errors.invalid("public suffix list is empty: " .. path) end
  cached[path] = l
  return l
end

local function labels_of(domain)
  local out = {}
  for label in (domain .. "."):gmatch("([^.]*)%.") do out[#out + 1] = label end
  return out
end

-- list:public_suffix(domain) -> the public suffix of domain (the longest rule that matches; an
-- exception rule wins and stands for its parent; no rule: the last label) | nil when domain is
-- not a name.
function List:public_suffix(domain)
  if type(domain) ~= "string" then error("bad argument #1 to 'public_suffix' (string expected)", 2) end
  local d = ascii(domain)
  if not d or d == "" or d:find("..", 1, true) or d:sub(1, 1) == "." then return nil end
  local labels = labels_of(d)
  local n = #labels
  local suffixes = {}
  for i = n, 1, -1 do
    suffixes[i] = i == n and labels[n] or labels[i] .. "." .. suffixes[i + 1]
  end
  for i = 1, n do
    if self.exception[suffixes[i]] then return suffixes[i + 1] end
  end
  for i = 1, n do
    if self.normal[suffixes[i]] or (i < n and self.wild[suffixes[i + 1]]) then return suffixes[i] end
  end
  return labels[n]
end

-- list:organizational_domain(domain) -> the public suffix and one label more, lower case in
-- A-labels | nil when domain is itself a public suffix (or not a name).
function List:organizational_domain(domain)
  local ps = self:public_suffix(domain)
  if not ps then return nil end
  local d = ascii(domain)
  if d == ps then return nil end
  local rest = d:sub(1, #d - #ps - 1)
  return (rest:match("([^.]+)$")) .. "." .. ps
end

-- Shorthands over the default list: -> result | nil, err
function M.public_suffix(domain)
  local l, err = M.load()
  if not l then return nil, err end
  return l:public_suffix(domain)
end

function M.organizational_domain(domain)
  local l, err = M.load()
  if not l then return nil, err end
  return l:organizational_domain(domain)
end

return M

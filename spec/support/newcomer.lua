-- Test utilities for the docs, examples and install specs: a throwaway CA with a server
-- certificate for the names the documentation uses, a DKIM key, the docs sink process, and
-- running one of our own Lua scripts (with the sanitizer preload kept under make test-asan).
local helper = require "helper"
local q = helper.quote

local N = {}

-- CA + server certificate for smtp.example.com, smtp.gmail.com, smtp.office365.com,
-- mail.example.org, mx.example.org, localhost, 127.0.0.1; an RSA key for DKIM; sample files.
function N.material()
  local dir = helper.tmpdir()
  local out = helper.sh("cd " .. q(dir) .. " && (" .. [[
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=docs test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" &&
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=smtp.example.com" &&
printf 'subjectAltName=DNS:smtp.example.com,DNS:smtp.gmail.com,DNS:smtp.office365.com,DNS:mail.example.org,DNS:mx.example.org,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext.cnf &&
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf &&
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out dkim.pem &&
head -c 2000 /dev/urandom > report.pdf && head -c 300 /dev/urandom > logo.png &&
printf 'a,b\r\n1,2\r\n' > a.csv && echo ok) 2>&1]])
  assert(out:match("ok%s*$"), "test material: " .. out)
  return { dir = dir, ca = dir .. "/ca.pem", cert = dir .. "/server.pem", key = dir .. "/server.key",
    dkim = dir .. "/dkim.pem" }
end

-- Starts spec/support/docs_sink.lua on a free port; returns the process, its port and its mail dir.
function N.sink(m)
  local port = helper.free_port()
  local mail = helper.tmpdir()
  local p = helper.spawn({ helper.lua, helper.root .. "/spec/support/docs_sink.lua", tostring(port),
    m.cert, m.key, mail }, { limit = 300 })
  assert(helper.wait_port("127.0.0.1", port, 10), "docs sink did not start: " .. p:output())
  return p, port, mail
end

-- The env prefix for our own Lua processes: the sanitizer preload (make test-asan), then `env`.
function N.env(vars)
  local parts = {}
  for k, v in pairs(helper.preload) do parts[#parts + 1] = k .. "=" .. q(v) end
  for k, v in pairs(vars or {}) do parts[#parts + 1] = k .. "=" .. q(v) end
  return "env " .. table.concat(parts, " ") .. " "
end

-- Runs a shell command line; returns its combined output and exit code.
function N.run(cmd)
  local out, _, code = helper.sh("(" .. cmd .. ") 2>&1; echo \"exit=$?\"")
  local rc = tonumber(out:match("exit=(%d+)%s*$"))
  return out:gsub("exit=%d+%s*$", ""), rc
end

-- Number of messages the docs sink stored.
function N.count(mail)
  local out = helper.sh("ls -1 " .. q(mail) .. " | wc -l")
  return tonumber(out) or 0
end

-- The ```lua blocks of a Markdown file: { {line=, code=}, ... }
function N.lua_blocks(path)
  local text = assert(helper.read(path), "cannot read " .. path)
  local blocks, cur, start, ln = {}, nil, nil, 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    ln = ln + 1
    if cur then
      if line:match("^```%s*$") then
        blocks[#blocks + 1] = { line = start, code = table.concat(cur, "\n") .. "\n" }
        cur = nil
      else
        cur[#cur + 1] = line
      end
    elseif line:match("^```lua%s*$") then
      cur, start = {}, ln
    end
  end
  return blocks
end

return N

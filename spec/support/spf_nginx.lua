-- Inside nginx for spec/spf_spec.lua: POST /spf?ns=127.0.0.1:P with one "name<TAB>ip<TAB>mail_from
-- <TAB>helo<TAB>time limit" line per case; answers "name<TAB>result<TAB>explanation" per case, the checks made
-- by smtp.spf through its default resolver, which inside nginx is the cosocket one.
local M = {}

function M.run()
  local spf = require "smtp.spf"
  ngx.req.read_body()
  local body = ngx.req.get_body_data() or ""
  local ns = ngx.var.arg_ns
  local out = {}
  for line in body:gmatch("[^\n]+") do
    local f = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = field end
    local r, err = spf.check(f[2], f[3], f[4], { nameservers = { ns }, timeout = tonumber(f[5]),
      receiver = "mx.receiver.test", default_explanation = "DEFAULT" })
    out[#out + 1] = table.concat({ f[1], r and r.result or ("error " .. tostring(err)),
      r and r.explanation or "", require("smtp.transport").dns() == require("smtp.transport.ngx_dns")
      and "ngx_dns" or "other" }, "\t")
  end
  ngx.print(table.concat(out, "\n"), "\n")
end

return M

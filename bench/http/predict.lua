-- wrk script: POST one seed-style /predict request, over and over.
--
--   wrk -t1 -c32 -d10s --latency -s bench/http/predict.lua http://127.0.0.1:8080/predict
--
-- The body is the first row of fixtures/data/bc_test.csv, or $PREDICT_BODY.
-- Works unchanged against `outpost-runtime serve` and bench/seed_server.
-- At the end it prints one machine-readable line for bench/http/run.sh:
--   WRK_RESULT {"requests":…,"duration_s":…,"rps":…,"p50_us":…,"p90_us":…,"p99_us":…,"max_us":…,"non2xx":…,"socket_errors":…}

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("PREDICT_BODY") or
  '{"features":[13.68,16.33,87.76,575.5,0.09277,0.07255,0.01752,0.0188,0.1631,0.06155,0.2047,0.4801,1.373,17.25,0.003828,0.007228,0.007078,0.005077,0.01054,0.001697,15.85,20.2,101.6,773.4,0.1264,0.1564,0.1206,0.08704,0.2806,0.07782]}'

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end

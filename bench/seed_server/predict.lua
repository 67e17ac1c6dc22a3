-- wrk -t1 -c16 -d30s -s bench/seed_server/predict.lua http://127.0.0.1:8000/predict
-- POSTs the first row of fixtures/data/bc_test.csv (label 1) to a seed-style /predict;
-- works unchanged against the Rust server (outpost-runtime serve --model fixtures/bc_mlp.onnx).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"features":[13.68,16.33,87.76,575.5,0.09277,0.07255,0.01752,0.0188,0.1631,0.06155,0.2047,0.4801,1.373,17.25,0.003828,0.007228,0.007078,0.005077,0.01054,0.001697,15.85,20.2,101.6,773.4,0.1264,0.1564,0.1206,0.08704,0.2806,0.07782]}'

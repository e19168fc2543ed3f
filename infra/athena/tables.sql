-- Athena / Glue tables over the nightly labels (taxonomy fashion-product-images).
-- Column names and types mirror fashionlabel/label/schema.py and fashionlabel/latest.py (a test checks it).
-- Nightly root: s3://fashionlabel-nightly/nightly  (fashionlabel nightly --root).
--
--   aws athena start-query-execution --query-string file://infra/athena/tables.sql ...  (one statement at a time)

CREATE DATABASE IF NOT EXISTS fashionlabel;

-- history: one row per product per night, partitioned by night. Partition projection: no MSCK REPAIR,
-- a new night is visible as soon as its files are.
CREATE EXTERNAL TABLE IF NOT EXISTS fashionlabel.history (
  `product_id` string,
  `image_sha256` string,
  `model_version` string,
  `taxonomy_version` string,
  `run_id` string,
  `labeled_at` timestamp,
  `gender` string,
  `gender_score` float,
  `gender_topk` array<struct<label:string,score:float>>,
  `masterCategory` string,
  `masterCategory_score` float,
  `masterCategory_topk` array<struct<label:string,score:float>>,
  `subCategory` string,
  `subCategory_score` float,
  `subCategory_topk` array<struct<label:string,score:float>>,
  `articleType` string,
  `articleType_score` float,
  `articleType_topk` array<struct<label:string,score:float>>,
  `baseColour` string,
  `baseColour_score` float,
  `baseColour_topk` array<struct<label:string,score:float>>,
  `season` string,
  `season_score` float,
  `season_topk` array<struct<label:string,score:float>>,
  `usage` string,
  `usage_score` float,
  `usage_topk` array<struct<label:string,score:float>>,
  `attributes` array<string>,
  `attributes_scores` array<struct<label:string,score:float>>,
  `needs_review` boolean,
  `error` string
)
PARTITIONED BY (`run_date` string)
STORED AS PARQUET
LOCATION 's3://fashionlabel-nightly/nightly/labels/history/'
TBLPROPERTIES (
  'parquet.compression' = 'ZSTD',
  'projection.enabled' = 'true',
  'projection.run_date.type' = 'date',
  'projection.run_date.format' = 'yyyy-MM-dd',
  'projection.run_date.range' = '2026-01-01,NOW',
  'storage.location.template' = 's3://fashionlabel-nightly/nightly/labels/history/run_date=${run_date}/'
);

-- latest: one row per product, newest label wins; products gone from the catalog have active = false.
-- The table reads the symlink manifest that each night replaces in one PUT (fashionlabel/latest.py), so a
-- query sees one whole snapshot, never a mix of two nights.
CREATE EXTERNAL TABLE IF NOT EXISTS fashionlabel.latest (
  `product_id` string,
  `image_sha256` string,
  `model_version` string,
  `taxonomy_version` string,
  `run_id` string,
  `labeled_at` timestamp,
  `gender` string,
  `gender_score` float,
  `gender_topk` array<struct<label:string,score:float>>,
  `masterCategory` string,
  `masterCategory_score` float,
  `masterCategory_topk` array<struct<label:string,score:float>>,
  `subCategory` string,
  `subCategory_score` float,
  `subCategory_topk` array<struct<label:string,score:float>>,
  `articleType` string,
  `articleType_score` float,
  `articleType_topk` array<struct<label:string,score:float>>,
  `baseColour` string,
  `baseColour_score` float,
  `baseColour_topk` array<struct<label:string,score:float>>,
  `season` string,
  `season_score` float,
  `season_topk` array<struct<label:string,score:float>>,
  `usage` string,
  `usage_score` float,
  `usage_topk` array<struct<label:string,score:float>>,
  `attributes` array<string>,
  `attributes_scores` array<struct<label:string,score:float>>,
  `needs_review` boolean,
  `error` string,
  `run_date` date,
  `active` boolean
)
ROW FORMAT SERDE 'org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe'
STORED AS INPUTFORMAT 'org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat'
OUTPUTFORMAT 'org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat'
LOCATION 's3://fashionlabel-nightly/nightly/labels/latest/_symlink_format_manifest/';

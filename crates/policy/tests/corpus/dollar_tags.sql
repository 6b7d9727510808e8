-- expect: statements
select $a$ $$ ) $a$, $b$$b$, a$$b from t; select $1::int
